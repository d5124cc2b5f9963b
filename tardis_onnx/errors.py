"""The one exception type the command line turns into a one-line error and exit code 2."""

import sys


class TardisError(Exception):
    """Bad input or an unsupported request; the message is one line for the user."""

    exit_code = 2


def report_error(exc: TardisError) -> int:
    """Print ``exc`` as a command's one-line error on stderr; return its exit code."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code
