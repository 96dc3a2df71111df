"""The CLI's surface as data: every command, and each parameter's flags, choices, default and whether it is required.

`tests/data/cli_surface.json` is this surface as it was before the restructuring of issue 23;
`test_cli_surface.py` compares the live app against it, so moving code cannot change a flag. Regenerate it
(`python tests/cli_surface.py > tests/data/cli_surface.json`) only for a deliberate change of the CLI.
"""

from __future__ import annotations

import enum
import json


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _annotation(p):
    descriptor = getattr(p, "type_descriptor", None)  # typer >= 0.2x keeps the annotation; older ones a click type
    return getattr(descriptor, "annotation", None)


def _type_name(p) -> str:
    annotation = _annotation(p)
    if annotation is not None:
        return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
    return getattr(getattr(p, "type", None), "name", "?")


def _choices(p):
    annotation = _annotation(p)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return sorted(m.value for m in annotation)
    choices = getattr(getattr(p, "type", None), "choices", None)
    return sorted(_plain(list(choices))) if choices is not None else None


def surface() -> dict:
    import typer

    from ddk_cache.cli.main import app

    root = typer.main.get_command(app)
    out = {"<root>": {p.name: sorted(p.opts + list(p.secondary_opts)) for p in root.params}}
    for name, command in sorted(root.commands.items()):
        params = {}
        for p in command.params:
            entry = {
                "kind": "argument" if "Argument" in type(p).__name__ else "option",
                "flags": sorted(p.opts + list(p.secondary_opts)),
                "required": bool(p.required),
                "default": _plain(p.default),
            }
            entry["type"] = _type_name(p)
            choices = _choices(p)
            if choices is not None:
                entry["choices"] = choices
            params[p.name] = entry
        out[name] = params
    return out


if __name__ == "__main__":
    print(json.dumps(surface(), indent=1, sort_keys=True))
