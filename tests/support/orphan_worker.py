"""A torchrun worker that leaves an orphan behind and reports what became of it.

It forks a child that forks a grandchild and exits at once: the grandchild, an orphan, is re-parented to the
nearest subreaper (or PID 1) and ends 0.3 s later. The worker then watches /proc for up to 5 s and writes to
argv[1] one word: ``reaped`` (its new parent waited for it), ``Z`` (it stayed a zombie) or another state.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(0.3)
            os._exit(0)
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    orphan = int(os.read(read, 32))
    state, deadline = "alive", time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]  # R, S, Z, ...
        except FileNotFoundError:
            state = "reaped"
            break
        time.sleep(0.1)
    out.write_text(state)


if __name__ == "__main__":
    main()
