"""``trainer-launch``: torchrun with the trainer's exit codes, for pods.

torchrun itself exits 1 whatever its workers returned, so a pod could not tell a preempted run (workers exit 75
after committing a checkpoint) or a bad config (exit 2) from a crash, and the Job's pod failure policy could
not treat them differently. This wrapper takes exactly torchrun's arguments, runs its agent in this process and
turns the outcome into one exit code (see trainer/exit_codes.py):

- every worker succeeded: 0;
- any worker exited 2 (bad config or input): 2, which the chart's Job fails at once;
- every failed worker exited 75, or this agent got SIGTERM/SIGINT (the pod is being stopped): 75, which the
  chart does not count against the restart budget;
- anything else (a crash, a lost peer, a rendezvous that timed out): 1, which the Job retries.

It also turns on torch elastic's worker timer (``TORCHELASTIC_ENABLE_FILE_TIMER=1``), through which a rank that
makes no progress for ``train.hang_timeout_seconds`` is killed and named (trainer/watchdog.py).

Under an Indexed Job it also decides which pod hosts the c10d rendezvous store: the pod whose
``TRAINER_NODE_INDEX`` is 0, instead of torchrun's guess from host names (which misses when the endpoint is a
short service name and the pod's canonical name is its fully qualified one).

The chart runs torchrun with ``--max-restarts=0``: when any worker dies, every pod exits and the Job replaces
them, so the whole group re-forms from fresh agents and resumes from the latest checkpoint. (Re-forming in place
around a surviving agent timed out in the cluster simulation: the survivor's new round waited on the dead
agent.) A replacement pod can then start while the old rendezvous host is still going away, or before the new
one listens; such rendezvous errors are retried here, inside the pod, for up to ``TRAINER_RDZV_RETRY_SECONDS``
(default 600), so they do not use up the Job's restart budget.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from trainer.errors import first_line
from trainer.exit_codes import DESCRIPTIONS, EXIT_CONFIG_ERROR, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED
from trainer.watchdog import enable_hang_watchdog

log = logging.getLogger("trainer.launch")

NODE_INDEX_ENV = "TRAINER_NODE_INDEX"
RETRY_ENV = "TRAINER_RDZV_RETRY_SECONDS"
RETRY_PAUSE_S = 3.0


def exit_code_for(worker_codes: Iterable[int]) -> int:
    """One exit code for the pod from its failed workers' exit codes (negative: killed by that signal)."""
    codes = set(worker_codes)
    if EXIT_CONFIG_ERROR in codes:
        return EXIT_CONFIG_ERROR
    if codes and codes <= {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    return EXIT_FAILURE if codes else EXIT_OK


def with_rendezvous_host(args: Any, environ: dict[str, str]) -> None:
    """Add ``is_host=<index == 0>`` to a c10d rendezvous's options when the node index is known and unset."""
    index = environ.get(NODE_INDEX_ENV, "").strip()
    options = [item for item in (args.rdzv_conf or "").split(",") if item.strip()]
    if args.rdzv_backend != "c10d" or not index or any(item.split("=")[0].strip() == "is_host" for item in options):
        return
    if not index.isdigit():
        raise ValueError(f"{NODE_INDEX_ENV}={index!r} is not a node index (0, 1, ...)")
    options.append(f"is_host={'true' if int(index) == 0 else 'false'}")
    args.rdzv_conf = ",".join(options)


def retry_seconds(environ: dict[str, str]) -> float:
    text = environ.get(RETRY_ENV, "600")
    try:
        return max(0.0, float(text))
    except ValueError:
        raise ValueError(f"{RETRY_ENV}={text!r} is not a number of seconds") from None


def run_with_retries(args: Any, where: str, retry_until: float) -> int:
    """torchrun's agent, with the rendezvous retried until ``retry_until``; the pod's exit code."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousError,
    )
    from torch.distributed.run import run

    def stop(signum: int, _frame: Any) -> None:
        # a stop before torchrun installs its own handler (e.g. while waiting to retry the rendezvous)
        raise SignalException(f"process {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        while True:
            try:
                run(args)
                return EXIT_OK
            except (RendezvousClosedError, RendezvousConnectionError, DistNetworkError) as err:
                if time.monotonic() + RETRY_PAUSE_S > retry_until:
                    raise
                log.warning("%s: rendezvous at %s not ready (%s: %s); retrying in %.0f s", where,
                            args.rdzv_endpoint, type(err).__name__, first_line(err), RETRY_PAUSE_S)
                time.sleep(RETRY_PAUSE_S)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        log.error("%s: workers exited with %s", where, ", ".join(str(c) for c in sorted(codes)))
        return exit_code_for(codes)
    except SignalException as err:
        log.warning("%s: stopped by %s; workers were asked to save a checkpoint", where, err.sigval.name)
        return EXIT_PREEMPTED
    except RendezvousError as err:
        log.error("%s: rendezvous failed: %s: %s", where, type(err).__name__, first_line(err))
        return EXIT_FAILURE
    except DistNetworkError as err:
        log.error("%s: rendezvous store unreachable: %s", where, first_line(err))
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the command (PID 1 in a container): reap orphans and forward signals (trainer/reaper.py)
        from trainer.reaper import supervise

        supervised = supervise()
        if supervised is not None:
            return supervised
    from torch.distributed.run import parse_args

    from trainer.logs import setup_logging

    try:
        setup_logging(os.environ.get("TRAINER_LOG_LEVEL", "INFO"), rank=None)
    except ValueError as err:
        sys.stderr.write(f"trainer-launch: error: TRAINER_LOG_LEVEL: {err}\n")
        return EXIT_CONFIG_ERROR
    enable_hang_watchdog(os.environ)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    node = os.environ.get(NODE_INDEX_ENV, "")
    where = f"trainer-launch (node {node})" if node else "trainer-launch"
    try:
        with_rendezvous_host(args, dict(os.environ))
        retry_until = time.monotonic() + retry_seconds(dict(os.environ))
    except ValueError as err:
        log.error("%s: %s", where, err)
        return EXIT_CONFIG_ERROR

    code = run_with_retries(args, where, retry_until)
    log.info("%s: exit %d: %s", where, code, DESCRIPTIONS.get(code, "?"))
    return code


if __name__ == "__main__":
    sys.exit(main())
