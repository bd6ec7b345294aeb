"""Fixed-width text tables for the terminal and for logs, laid out by rich.

Columns size to their widest cell (a layout named ``1x1 (1 of a card's 2 devices)`` moves the
next column instead of running into it), nothing wraps, and no colour or box is drawn: the
output is plain text that greps and diffs, whatever the terminal."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence


def render(header: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = (), indent: int = 0) -> list[str]:
    """The table as lines; ``right`` names the columns (by index) that align right, as numbers do."""
    from rich.console import Console
    from rich.table import Table

    right = set(right)
    table = Table(box=None, pad_edge=False, padding=(0, 1), show_header=bool(header), header_style=None,
                  show_edge=False, highlight=False)
    for index, title in enumerate(header):
        table.add_column(title, justify="right" if index in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    buffer = io.StringIO()
    # a width no row reaches: the table takes its natural width and never wraps
    Console(file=buffer, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(table)
    return [" " * indent + line.rstrip() for line in buffer.getvalue().splitlines()]
