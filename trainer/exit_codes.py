"""Exit codes of the ``trainer`` commands and of ``trainer.train`` (documented in docs/training.md; the chart's pod
failure policy and ``trainer watch`` map them): a preempted run is not a failure, a bad config must not be
retried, anything else may be."""

EXIT_OK = 0
EXIT_FAILURE = 1  # a crash or an error worth a retry (storage outage, NaN loss, ...)
EXIT_CONFIG_ERROR = 2  # bad config, data or checkpoint: retrying cannot help
EXIT_USAGE = EXIT_CONFIG_ERROR  # a command-line mistake, as argparse exits
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was committed (EX_TEMPFAIL: "try again later")

DESCRIPTIONS = {
    EXIT_OK: "completed",
    EXIT_FAILURE: "crashed",
    EXIT_CONFIG_ERROR: "bad config or input",
    EXIT_PREEMPTED: "preempted (checkpoint saved)",
}
