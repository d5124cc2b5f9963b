"""The one exception type the command line turns into a one-line error and exit code 2."""

import argparse
import sys
from collections.abc import Callable


class TardisError(Exception):
    """Bad input or an unsupported request; the message is one line for the user."""

    exit_code = 2


def report_error(exc: TardisError) -> int:
    """Print ``exc`` as a command's one-line error on stderr; return its exit code."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code


def run_command(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object], argv: list[str] | None
) -> int:
    """Parse ``argv`` and ``run`` it: exit code 0, or the one-line error of a :class:`TardisError`."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except TardisError as exc:
        return report_error(exc)
    return 0
