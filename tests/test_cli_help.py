"""`--help` reads whole at 80 columns: every option name in full, no `<bool>` placeholder, panels as sections."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from ddk_cache.cli.main import COMMANDS, app


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_at_80_columns_names_every_option_whole(name):
    text = _help(name)
    command = get_command(app).commands[name]
    for param in command.params:
        for flag in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if flag.startswith("-"):
                assert flag in text.split(), f"{name} --help cuts or leaves out {flag}"
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, f"{name} --help is wider than 80 columns: {too_long[0]!r}"
    assert "…" not in text and "<bool>" not in text
    for panel in {getattr(param, "rich_help_panel", None) for param in command.params} - {None}:
        assert f"\n{panel}:\n" in text, f"{name} --help lacks its {panel!r} section"


def test_top_level_help_lists_every_command():
    text = _help()
    for name in COMMANDS:
        assert f"  {name} " in text
