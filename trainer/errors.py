"""The one exception family for bad input from outside (files, JSON, options): the CLI prints its message as a
single ``trainer: error:`` line, without a traceback, and exits with status 1."""


class InputError(ValueError):
    """Bad input a user can fix; the message names the file or option and the problem."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors (library messages often run on)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
