"""The one exception type the command line turns into a one-line error and exit code 2."""


class TardisError(Exception):
    """Bad input or an unsupported request; the message is one line for the user."""

    exit_code = 2
