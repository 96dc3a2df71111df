"""Result tables that stay readable in an 80-column terminal.

Rich shrinks a table that does not fit by cutting cells with an ellipsis, which turned domain
names and headers into "medic…" and "teac…" in `inspect`. Here nothing is cut: numbers never
wrap, a header puts one word per line, the table has no vertical rules (two columns of padding saved per
column), and when it still does not fit, the name column folds (a long domain name continues on
the next line) instead of losing characters.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table


def name_table(title: str, columns: Sequence[str], name_columns: int = 1) -> Table:
    """A table whose first `name_columns` columns hold names (domains, splits) and the rest numbers."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for i, column in enumerate(columns):
        if i == 0:
            table.add_column(column, overflow="fold", min_width=min(12, len(column) + 6))
        elif i < name_columns:
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column.replace(" ", "\n"), justify="right", no_wrap=True)  # one word per header line
    return table
