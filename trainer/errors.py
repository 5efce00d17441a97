"""The one exception family for bad input from outside (files, JSON, options): the CLI prints its message as a
single ``trainer: error:`` line, without a traceback, and exits with status 1."""


class InputError(ValueError):
    """Bad input a user can fix; the message names the file or option and the problem."""
