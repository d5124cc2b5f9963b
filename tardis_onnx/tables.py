"""The one plain-text table every command prints: columns two spaces apart, text left, numbers right."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    """Lines of ``header`` and ``rows`` (cells as ``str``), each column as wide as its widest cell;
    the columns numbered in ``right`` are right-aligned. Trailing spaces are trimmed."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  ".join(padded).rstrip())
    return lines
