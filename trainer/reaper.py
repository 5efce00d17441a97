"""PID 1 duties for ``trainer-launch``: forward signals to the launcher and reap orphaned processes.

In the container ``trainer-launch`` is PID 1 (the image's entrypoint and the chart's command). A process whose
parent dies (a data-loader worker of a crashed rank, a shell's background job, a helper a library forked) is
re-parented to PID 1, and stays a zombie until PID 1 waits for it. torchrun waits only for its own workers, and
Python's ``subprocess`` only for the children it started, so a long run would collect zombies, each holding a
process-table slot.

``supervise()`` splits the command in two, as ``tini`` does: the parent becomes a tiny init that blocks the
signals, forwards each one to its child, reaps every process that ends up as its child, and exits with the
child's status; the child goes on as the launcher. The parent also marks itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so orphans come back to it outside a container too (``trainer-launch`` on a
machine, where PID 1 is the host's init). The launcher's own workers stay the launcher's children, so nothing here
ever waits for them in the launcher's place (their exit codes decide the pod's).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

DISABLE_ENV = "TRAINER_LAUNCH_NO_REAPER"  # "1": run in one process (the supervisor adds nothing to wait for)
PR_SET_CHILD_SUBREAPER = 36
SI_KERNEL = 0x80  # si_code of a signal the kernel sent (a terminal's Ctrl-C goes to the whole process group)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGALRM, signal.SIGWINCH, signal.SIGCONT)


def set_child_subreaper() -> bool:
    """Orphans of this process's descendants become its children (Linux 3.4+); False where not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_status(wait_status: int) -> int:
    """The child's exit code, or 128 + N when signal N killed it (as a shell or a container runtime reports)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def supervise() -> int | None:
    """Fork: the child returns None and carries on as the launcher; the parent forwards signals and reaps until
    the child exits, then returns its exit code. None at once where this does not apply (not Linux, disabled)."""
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV) == "1":
        return None
    set_child_subreaper()
    watched = {signal.SIGCHLD, *FORWARDED}
    # blocked before the fork, so that no signal sent in between is lost or handled by the default action
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return None
    return _reap(child, watched)


def _reap(child: int, watched: set[signal.Signals]) -> int:
    status: int | None = None
    while status is None:
        info = signal.sigtimedwait(watched, 1.0)  # the timeout also reaps a SIGCHLD merged with another
        if info is not None and info.si_signo != signal.SIGCHLD and info.si_code != SI_KERNEL:
            # sent by a process (kubelet, docker stop, kill): pass it on. A kernel-sent one (Ctrl-C in a
            # terminal) reached the whole foreground process group, the launcher included, already.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, info.si_signo)
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # no children left
            if pid == 0:
                break  # children left, none ended
            if pid == child:
                status = exit_status(wait_status)
    return status
