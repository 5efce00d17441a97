"""Run the real helm (and the linters) that scripts/test-tools.sh put under .tools/bin, with a throwaway HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "train"
TOOLS = REPO / ".tools" / "bin"


def tool(name: str) -> str:
    """A tool from .tools/bin (made by `make tools`), else from PATH; a clear failure when neither has it."""
    local = TOOLS / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise AssertionError(f"{name} not found: run `make tools` (scripts/test-tools.sh) first")
    return found


def run_tool(name: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix=f"{name}-home-") as home:
        full_env = {**os.environ, "HOME": home, "XDG_CACHE_HOME": f"{home}/cache",
                    "XDG_CONFIG_HOME": f"{home}/config", "XDG_DATA_HOME": f"{home}/data", **(env or {})}
        return subprocess.run([tool(name), *args], capture_output=True, text=True, cwd=cwd, env=full_env,
                              timeout=timeout)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("helm", *args)


def render_text(release: str, *values_files: Path, namespace: str = "training", extra: tuple[str, ...] = ()) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace, *extra]
    for path in values_files:
        args += ["-f", str(path)]
    result = helm(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def render(release: str, *values_files: Path, namespace: str = "training",
           extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The rendered objects (hooks and tests included), parsed."""
    return [doc for doc in yaml.safe_load_all(render_text(release, *values_files, namespace=namespace, extra=extra))
            if doc]
