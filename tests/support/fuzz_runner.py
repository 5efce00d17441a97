"""Runs many CLI cases in one process (imports are paid once) under a hard address-space limit, and reports
each one's exit status and whether anything looked like a traceback. Used by tests/integration/test_fuzz.py:

    python -m tests.support.fuzz_runner CASES.json RESULTS.json LIMIT_BYTES

Each case is ``{"entry": "cli" | "train", "argv": [...]}``. A case that raises anything but SystemExit is a
finding (its traceback is kept); so is any ``Traceback`` text in what it printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time
import traceback
from pathlib import Path


def run_case(entry: str, argv: list[str]) -> dict[str, object]:
    if entry == "cli":
        from trainer.cli import main
    else:
        from trainer.train import main
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    crash = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # exactly what the fuzz pass looks for
            code, crash = -1, traceback.format_exc()
    text = err.getvalue() + out.getvalue()
    return {"argv": argv, "code": code, "crash": crash[-3000:], "seconds": round(time.monotonic() - started, 2),
            "traceback": "Traceback (most recent call last)" in text, "stderr_tail": err.getvalue()[-1500:],
            "longest_line": max((len(line) for line in err.getvalue().splitlines()), default=0)}


def main() -> None:
    cases_path, results_path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = []
    for case in json.loads(Path(cases_path).read_text()):
        with open(results_path + ".running", "w") as handle:  # names the case if the process itself dies
            json.dump(case, handle)
        results.append(run_case(case["entry"], case["argv"]))
    with open(results_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
