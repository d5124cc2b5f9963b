"""The one exception type the command line turns into a one-line error and exit code 2, and the
argument types every command's parser shares (finite floats, non-negative integers)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

MAX_ERROR_CHARS = 300  # the whole stderr line, "error: " included


class TardisError(Exception):
    """Bad input or an unsupported request; the message is one line for the user."""

    exit_code = 2


def one_line(text: object, limit: int = MAX_ERROR_CHARS - len("error: ")) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters: a longer one loses
    its middle (long paths), keeping its start (what failed) and its end (what to do)."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    head = (limit - 5) * 3 // 5
    tail = limit - 5 - head
    return f"{line[:head].rstrip()} ... {line[-tail:].lstrip()}"


def report_error(exc: TardisError) -> int:
    """Print ``exc`` as a command's one-line error on stderr; return its exit code."""
    print(f"error: {one_line(exc) or type(exc).__name__}", file=sys.stderr)
    return exc.exit_code


def is_onnxruntime_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of ONNX Runtime's own exceptions (``Fail``, ``InvalidArgument``, ...)."""
    return type(exc).__module__.startswith("onnxruntime")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def external_error(exc: BaseException, what: str) -> TardisError:
    """A :class:`TardisError` for a failure of ONNX Runtime or numpy on bad input: ``what``, then the first
    line of the library's message."""
    first = first_line(exc).replace("[ONNXRuntimeError] : ", "").strip()
    return TardisError(f"{what}: {first}")


def translate_error(exc: BaseException) -> TardisError | None:
    """The one-line :class:`TardisError` for a failure bad input causes outside our code (ONNX Runtime's
    own exceptions, running out of memory on huge shapes), or None for anything else (a bug: let it raise)."""
    if isinstance(exc, TardisError):
        return exc
    if is_onnxruntime_error(exc):
        return external_error(exc, "ONNX Runtime failed")
    if isinstance(exc, MemoryError):
        return external_error(exc, "not enough memory for this input")
    return None


# How the running command was invoked ("tardis-onnx optimize", "python -m tardis_onnx verify"), set by the
# dispatcher in ``__main__`` so that usage and --help name it; None: the module's own ``prog``.
invoked_as: str | None = None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default that has a value (not the ``None``/``False`` of unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, a usage error raised as a one-line :class:`TardisError` (argparse would
    print the usage too); --help with the defaults, under the name the command was invoked by."""

    def error(message: str):
        raise TardisError(message)

    parser.error = error  # type: ignore[method-assign]
    parser.formatter_class = HelpFormatter
    if invoked_as is not None:
        parser.prog = invoked_as
    return parser.parse_args(argv)


def run_command(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object], argv: list[str] | None
) -> int:
    """Every command's ``main``: parse ``argv`` and ``run`` it. The exit code ``run`` returns (an int; else 0),
    or the one-line ``error:`` of a :class:`TardisError` (ONNX Runtime's errors and running out of memory
    included) and its exit code 2; anything else is a bug and raises."""
    try:
        args = parse_arguments(parser, argv)
        check_environment()
        status = run(args)
    except Exception as exc:
        translated = translate_error(exc)
        if translated is None:
            raise
        return report_error(translated)
    return status if isinstance(status, int) else 0


# --- environment ---------------------------------------------------------------------------------------------


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty); a one-line
    :class:`TardisError` when it is not a whole number >= ``minimum``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise TardisError(f"${name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise TardisError(f"${name} must be >= {minimum}, got {number}")
    return number


def check_environment() -> None:
    """Refuse bad ``TARDIS_*`` settings before any work."""
    env_int("TARDIS_THREADS", 2)


# --- argument types ------------------------------------------------------------------------------------------


def finite_float(text: str) -> float:
    """argparse type: a finite float (``float`` alone accepts ``nan`` and ``inf``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a finite float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _integer(text, 0)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _integer(text, 1)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        return _integer(text, minimum)

    parse.__name__ = f"int_at_least_{minimum}"
    return parse
