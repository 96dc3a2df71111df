"""The one base every piece of store metadata derives from: `from_dict` / `to_dict` written once, from the fields.

Why derive them (as zarr-python's `Metadata` base does for its own metadata): each header class used to
spell out both directions by hand, eight times, and the two could drift (a field read but never written,
or written under another key). Here a field's type says how its key is checked (`int | None` is optional,
a `Metadata` type is a nested object parsed under its dotted path) and `to_dict` is the same fields in
reverse. The few classes whose JSON is not simply their fields (the flattened capture, the root header's
`format` key) override one method and say why.

Field metadata: `key` is the JSON key where it differs from the field's name (`key=None` marks `extra`,
the keys this version does not model, kept and written back unchanged); `optional` makes a key with a
non-None type optional (absent means the field's default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Union

from ddk_cache.errors import StoreError


class HeaderError(StoreError):
    """A header key missing or of the wrong type (`damaged`), or a header this version cannot read at all.

    The message names the key's dotted path; `at(url)` says which store and what to do. `not_ddk_cache`
    tells a Zarr store that is not ours from one of ours that is damaged or of another version, so callers
    decide by a field rather than by the message's text.
    """

    def __init__(self, message: str, damaged: bool = True, not_ddk_cache: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged
        self.not_ddk_cache = not_ddk_cache

    def at(self, url: str) -> StoreError:
        if self.damaged:
            return StoreError(f"{url}: {self} (its zarr.json was edited or damaged): restore it from a copy, or re-create the store")
        return StoreError(f"{url} {self}")


# -- checking one key: the one place that knows how to say "this key is wrong" ----------------------------------

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list", bool: "true or false"}


def take(raw: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    """`raw[key]` checked to be of `kind` (None allowed when `optional`); errors name `where.key`."""
    path = f"{where}.{key}" if where else key
    if key not in raw:
        if optional:
            return None
        raise HeaderError(f"the store header lacks '{path}'")
    value = raw[key]
    if value is None and optional:
        return None
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
        raise HeaderError(f"the store header's '{path}' is {short(value)}, not {_KIND_NAMES.get(kind, kind.__name__)}")
    return float(value) if kind is float else value


def take_object(raw: dict[str, Any], key: str, where: str, optional: bool = False) -> dict[str, Any] | None:
    return take(raw, key, dict, where, optional)


def short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown(raw: dict[str, Any], cls: type) -> dict[str, Any]:
    """The keys of `raw` that `cls` does not model (kept and written back as they were)."""
    known = {f.metadata.get("key", f.name) for f in dataclasses.fields(cls)}
    return {key: value for key, value in raw.items() if key not in known}


# -- the base --------------------------------------------------------------------------------------------------


def _json_key(f: dataclasses.Field) -> str | None:
    return f.metadata.get("key", f.name)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _plain(value: Any) -> Any:
    if isinstance(value, Metadata):
        return value.to_dict()
    if hasattr(value, "to_attrs"):  # a Capture: its own attribute form
        return value.to_attrs()
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclasses.dataclass(frozen=True)
class Metadata:
    """A typed part of a store's metadata. Subclasses are frozen dataclasses; their fields are their JSON."""

    # Whether `to_dict` leaves out keys whose value is None (True where older stores never wrote them).
    OMIT_NONE: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, raw: Any, where: str = "") -> Any:
        """Parse and check `raw`; a missing or mistyped key raises `HeaderError` naming its dotted path."""
        if not isinstance(raw, dict):
            raise HeaderError(f"the store header's '{where}' is {short(raw)}, not an object")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _json_key(f)
            if key is None:
                values[f.name] = unknown(raw, cls)
                continue
            kind, optional = _unwrap(hints[f.name])
            optional = optional or f.metadata.get("optional", False)
            if isinstance(kind, type) and issubclass(kind, Metadata):
                nested = take_object(raw, key, where, optional)
                value = kind.from_dict(nested, f"{where}.{key}" if where else key) if nested is not None else None
            else:
                value = take(raw, key, typing.get_origin(kind) or kind, where, optional)
            if value is None and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING):
                continue  # absent: the field's default
            values[f.name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON under their keys (`extra` merged back), nested parts as their own `to_dict`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), _json_key(f)
            if key is None:
                out.update(value)
            elif not (value is None and (self.OMIT_NONE or f.metadata.get("omit_none", False))):
                out[key] = _plain(value)
        return out
