"""The one Markdown table writer of the toolkit (results, calibration and comparison tables).

Cells are escaped so that any text stays in its cell: ``|`` becomes ``\\|`` and line breaks
become spaces (a Markdown table row is one line).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# The delimiter row's cell for each alignment; None leaves the renderer's default (left).
_RULES = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def markdown_table(
    header: Sequence[object], rows: Iterable[Sequence[object]], align: Sequence[str | None] | None = None
) -> str:
    """A GitHub-flavoured Markdown table, one line per row, without a trailing newline.

    ``header`` and every row hold one cell per column (``str()`` of each, ``None`` as an
    empty cell); ``align`` gives each column ``"left"``, ``"right"``, ``"center"`` or None.
    A row or ``align`` of another length is a programming error (ValueError), not a ragged table.
    """
    n_columns = len(header)
    if n_columns == 0:
        raise ValueError("a Markdown table needs at least one column")
    align = [None] * n_columns if align is None else list(align)
    if len(align) != n_columns:
        raise ValueError(f"align has {len(align)} entries for {n_columns} columns")
    unknown = [a for a in align if a not in _RULES]
    if unknown:
        raise ValueError(f"unknown alignment {unknown[0]!r}; use 'left', 'right', 'center' or None")
    lines = [_row(header), "|" + "".join(f"{_RULES[a]}|" for a in align)]
    for number, cells in enumerate(rows, start=1):
        if len(cells) != n_columns:
            raise ValueError(f"row {number} has {len(cells)} cells for {n_columns} columns")
        lines.append(_row(cells))
    return "\n".join(lines)


def escape_cell(cell: object) -> str:
    """The text of one cell: ``str(cell)`` (empty for None) with ``|`` escaped and line breaks as spaces."""
    text = "" if cell is None else str(cell)
    return _LINE_BREAK.sub(" ", text).replace("|", "\\|")


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(escape_cell(cell) for cell in cells) + " |"
