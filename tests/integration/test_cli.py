"""`trainer ls` / `trainer cp` as users run them: real processes against the local S3 server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import BCCD, REPO, S3Env


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ), timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_console_script_is_installed_and_matches_python_dash_m() -> None:
    script = Path(sys.executable).parent / "trainer"
    assert script.exists()
    direct = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and direct.stdout == run("--version").stdout


def test_cp_and_ls_round_trip_a_data_set(s3: S3Env, tmp_path: Path) -> None:
    run("cp", "-r", str(BCCD / "ImageSets"), s3.uri("sets"))
    run("cp", str(BCCD / "LICENSE"), s3.uri("docs/"))  # trailing '/' keeps the name
    listing = run("ls", s3.uri()).stdout.splitlines()
    assert any(line.endswith(s3.uri("sets/")) and "DIR" in line for line in listing)
    assert any(line.endswith(s3.uri("docs/")) for line in listing)

    rows = [json.loads(line) for line in run("ls", "-r", "--json", s3.uri("sets")).stdout.splitlines()]
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in rows) == ["test.txt", "train.txt", "trainval.txt", "val.txt"]
    assert all(r["size"] == (BCCD / "ImageSets/Main" / r["uri"].rsplit("/", 1)[1]).stat().st_size for r in rows)
    assert run("ls", "-r", "--summary", s3.uri()).stdout.splitlines()[-1].startswith("5 objects, ")

    out = tmp_path / "back"
    copied = run("cp", "-r", s3.uri("sets"), str(out), "--log-level", "INFO")
    assert "copied 4 objects" in copied.stderr
    for name in ("train.txt", "val.txt"):
        assert (out / "Main" / name).read_bytes() == (BCCD / "ImageSets/Main" / name).read_bytes()
    run("cp", s3.uri("docs/LICENSE"), str(tmp_path))  # into an existing directory
    assert (tmp_path / "LICENSE").read_bytes() == (BCCD / "LICENSE").read_bytes()


def test_cp_of_a_directory_needs_recursive(s3: S3Env, tmp_path: Path) -> None:
    shutil.copytree(BCCD / "ImageSets", tmp_path / "sets")
    result = run("cp", str(tmp_path / "sets"), s3.uri("x"), ok=False)
    assert result.returncode == 1 and "use --recursive" in result.stderr and "Traceback" not in result.stderr


def test_ls_of_nothing_is_an_error_but_an_empty_bucket_is_not(s3: S3Env) -> None:
    assert run("ls", s3.uri()).stdout == ""
    missing = run("ls", s3.uri("nothing/here"), ok=False)
    assert missing.returncode == 1 and "no such object" in missing.stderr


def test_usage_errors_exit_2() -> None:
    assert run("cp", "only-one-arg", ok=False).returncode == 2
    assert run("cp", "a", "b", "--workers", "0", ok=False).returncode == 2
    assert run("ls", "x", "--log-level", "LOUD", ok=False).returncode == 2
    assert run(ok=False).returncode == 2


def test_log_level_debug_shows_more(s3: S3Env, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    quiet = run("--log-level", "WARNING", "cp", str(tmp_path / "f.txt"), s3.uri("f.txt"))
    assert quiet.stderr == ""
    assert "copied 1 objects" in run("cp", str(tmp_path / "f.txt"), s3.uri("g.txt")).stderr
