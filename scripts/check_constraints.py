"""Fail unless this Python environment holds exactly the versions pinned in constraints.txt.

    python scripts/check_constraints.py constraints.txt

The image build runs it after `pip install --constraint constraints.txt` (Dockerfile), and so does
tests/e2e/test_image.py on its fresh environment: every installed distribution must be pinned there, at that
version, so the image runs what the test suite runs. pip's own tooling (pip, setuptools, wheel) is exempt, as
`pip freeze` leaves it out of the lock. Standard library only: it runs before anything else is trusted.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

TOOLING = {"pip", "setuptools", "wheel"}
REQUIRED = ("detection-trainer", "torch", "torchvision")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """`name==version` lines of a constraints file (comments and blank lines skipped)."""
    out = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if match is None:
            raise ValueError(f"not an exact pin: {raw!r}")
        out[canonical(match[1])] = match[2]
    return out


def installed() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def problems(pinned: dict[str, str], present: dict[str, str], own: str = "detection-trainer") -> list[str]:
    """What differs from the lock; the trainer's own package is not in it and only has to be present."""
    found = []
    for name in REQUIRED:
        if name not in present:
            found.append(f"{name} is not installed")
    for name, version in sorted(present.items()):
        if name in TOOLING or name == own:
            continue
        if name not in pinned:
            found.append(f"{name}=={version} is installed but not pinned in constraints.txt (an untested version)")
        elif version != pinned[name]:
            found.append(f"{name}=={version} is installed but constraints.txt pins {pinned[name]}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = problems(pins(Path(argv[0]).read_text()), installed())
    for line in found:
        print(f"check_constraints: {line}", file=sys.stderr)
    if not found:
        print(f"check_constraints: every installed distribution matches {argv[0]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
