"""`--help` as plain text in sections, so it reads whole in an 80-column terminal.

Why not typer's rich tables: at 80 columns rich gives every option four columns (name, negation,
`<bool>` placeholder, help) and cuts the names to fit (`--global-batch-…`, `--gpu-memory-utiliz…`),
which is the one thing a reader of `--help` needs whole. click's own formatter puts each option on
a line of its own when its name is long and wraps only the help text; this module adds the one
thing rich had that click lacks: the panels (`rich_help_panel=` on an option) become sections.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand

OPTIONS = "Options"


class SectionedCommand(TyperCommand):
    """A command whose `--help` lists its parameters in sections named by their `rich_help_panel`."""

    def format_options(self, ctx: Any, formatter: Any) -> None:  # click's Context and HelpFormatter, as typer vendors them
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            default = "Arguments" if isinstance(param, TyperArgument) else OPTIONS
            sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        # the command's own arguments and untitled options first, as rich showed them; then the panels in order
        order = [name for name in ("Arguments", OPTIONS) if name in sections] + [n for n in sections if n not in ("Arguments", OPTIONS)]
        for name in order:
            with formatter.section(name):
                formatter.write_dl(sections[name])
