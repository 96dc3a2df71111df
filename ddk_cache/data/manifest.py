"""The data manifest: which domains to cache, where their text comes from, and how much.

A manifest is YAML. It is validated up front, with one precise message per problem,
because a typo found after hours of teacher inference is expensive. Relative paths are
resolved against the manifest's own folder so a manifest can travel with its data.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddk_cache.errors import ManifestError

DEFAULT_VALID_SEQUENCES = 500  # DDK evaluates on 500 held-out samples per domain.
LOCAL_BUILDERS = frozenset({"json", "parquet", "text", "csv", "arrow"})
DOMAIN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_TOP_KEYS = {"seq_len", "seed", "domains", "description"}
_DOMAIN_KEYS = {"name", "sources", "token_budget", "valid_sequences", "weight", "description"}
_SOURCE_KEYS = {"path", "name", "data_files", "split", "text_field", "template", "revision", "load_kwargs"}


@dataclass(frozen=True)
class SourceSpec:
    """One `datasets.load_dataset` call and how to turn its rows into text."""

    path: str
    data_files: tuple[str, ...] | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str | None = "text"
    template: str | None = None
    revision: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Columns a row must have for this source to produce text."""
        if self.template is not None:
            return tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)  # checked by template_fields
        return (self.text_field,) if self.text_field else ()

    def describe(self) -> str:
        files = f" files={list(self.data_files)}" if self.data_files else ""
        return f"{self.path}[{self.split}]{files}"


@dataclass(frozen=True)
class DomainSpec:
    """A domain: its text sources, train token budget, validation size and prior weight."""

    name: str
    sources: tuple[SourceSpec, ...]
    token_budget: int | None = None
    valid_sequences: int = DEFAULT_VALID_SEQUENCES
    weight: float = 1.0


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. `raw` keeps the document as written, for provenance."""

    seq_len: int
    seed: int
    domains: tuple[DomainSpec, ...]
    raw: dict[str, Any]
    source_path: Path | None = None

    def sha256(self) -> str:
        """Hash of the manifest's content (not its location), used to match stores to manifests."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()

    def domain(self, name: str) -> DomainSpec:
        for domain in self.domains:
            if domain.name == name:
                return domain
        raise KeyError(name)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; raises `ManifestError` with a one-line message."""
    path = Path(path)
    return parse_manifest(read_yaml(path, "manifest file", "--manifest"), base_dir=path.parent, source_path=path)


def read_yaml(path: Path, what: str, flag: str) -> Any:
    """The YAML document at `path`; a missing file or bad syntax is one line naming `what` and the `flag` that gave it."""
    if not path.is_file():
        raise ManifestError(f"{what} {str(path)!r} does not exist: check the {flag} path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path}: not valid YAML{where}: fix the syntax") from None


def parse_manifest(document: Any, base_dir: Path, source_path: Path | None = None) -> Manifest:
    """Validate a manifest document already parsed from YAML."""
    where = str(source_path) if source_path else "manifest"
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: expected a mapping with 'seq_len', 'seed' and 'domains'")
    reject_unknown(document, _TOP_KEYS, where)
    seq_len = positive_int(document, "seq_len", where, required=True)
    seed = document.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ManifestError(f"{where}: 'seed' must be an integer, got {seed!r}")
    domains_doc = document.get("domains")
    if not isinstance(domains_doc, list) or not domains_doc:
        raise ManifestError(f"{where}: 'domains' must be a non-empty list of domains")
    domains = tuple(_parse_domain(d, f"{where}: domains[{i}]", base_dir) for i, d in enumerate(domains_doc))
    seen: set[str] = set()
    for domain in domains:
        if domain.token_budget is not None and domain.token_budget < seq_len:
            raise ManifestError(
                f"{where}: domain {domain.name!r} has token_budget {domain.token_budget} < seq_len {seq_len}: "
                "the budget must hold at least one window"
            )
        if domain.name in seen:
            raise ManifestError(f"{where}: duplicate domain name {domain.name!r}: domain names must be unique")
        seen.add(domain.name)
    return Manifest(seq_len=seq_len, seed=seed, domains=domains, raw=document, source_path=source_path)


def _parse_domain(doc: Any, where: str, base_dir: Path) -> DomainSpec:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: a domain must be a mapping with 'name' and 'sources'")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: missing required field 'name'")
    if not DOMAIN_NAME_PATTERN.match(name):
        raise ManifestError(
            f"{where}: domain name {name!r} is not allowed: use letters, digits, '_', '-' or '.' (it names a Zarr group)"
        )
    where = f"{where} ({name!r})"
    reject_unknown(doc, _DOMAIN_KEYS, where)
    sources_doc = doc.get("sources")
    if sources_doc is None:
        raise ManifestError(f"{where}: missing required field 'sources'")
    if isinstance(sources_doc, dict):
        sources_doc = [sources_doc]
    if not isinstance(sources_doc, list) or not sources_doc:
        raise ManifestError(f"{where}: 'sources' must be a non-empty list of sources")
    sources = tuple(parse_source(s, f"{where}.sources[{i}]", base_dir) for i, s in enumerate(sources_doc))
    weight = doc.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ManifestError(f"{where}: 'weight' must be a positive number, got {weight!r}")
    return DomainSpec(
        name=name,
        sources=sources,
        token_budget=positive_int(doc, "token_budget", where, required=False),
        valid_sequences=positive_int(doc, "valid_sequences", where, required=False) or DEFAULT_VALID_SEQUENCES,
        weight=float(weight),
    )


def parse_source(doc: Any, where: str, base_dir: Path) -> SourceSpec:
    if isinstance(doc, str):
        doc = {"path": doc}
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: a source must be a mapping with at least 'path'")
    reject_unknown(doc, _SOURCE_KEYS, where)
    path = doc.get("path")
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: missing required field 'path' (a hub dataset id or one of {sorted(LOCAL_BUILDERS)})")
    if "text_field" in doc and "template" in doc:
        raise ManifestError(f"{where}: give either 'text_field' or 'template', not both")
    template = doc.get("template")
    if template is not None:
        template_fields(template, where, "template", "'{question} {answer}'")
    text_field = None if template is not None else doc.get("text_field", "text")
    if text_field is not None and (not isinstance(text_field, str) or not text_field):
        raise ManifestError(f"{where}: 'text_field' must be a column name")
    load_kwargs = doc.get("load_kwargs", {})
    if not isinstance(load_kwargs, dict):
        raise ManifestError(f"{where}: 'load_kwargs' must be a mapping of extra load_dataset arguments")
    if path not in LOCAL_BUILDERS and "data_files" in doc and "/" not in path and not (base_dir / path).is_dir():
        # files for a builder whose name is misspelled: datasets would ask the hub for a dataset of that name (5 retries,
        # ~45 s) before failing; hub ids are `org/name`, so a bare name next to data_files is a builder
        close = difflib.get_close_matches(path, sorted(LOCAL_BUILDERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ManifestError(f"{where}: 'path' {path!r} with 'data_files' is not a file builder: {hint}"
                            f"use one of {', '.join(sorted(LOCAL_BUILDERS))}, or a hub dataset id (org/name)")
    if path not in LOCAL_BUILDERS and (base_dir / path).is_dir():
        path = str((base_dir / path).resolve())  # a local dataset folder, relative to the manifest
    data_files = _resolve_data_files(doc.get("data_files"), where, base_dir, local=path in LOCAL_BUILDERS)
    if path in LOCAL_BUILDERS and not data_files:
        raise ManifestError(f"{where}: builder {path!r} needs 'data_files' (paths relative to the manifest)")
    split = doc.get("split", "train")
    if not isinstance(split, str):
        raise ManifestError(f"{where}: 'split' must be a string such as 'train'")
    return SourceSpec(
        path=path,
        data_files=data_files,
        config_name=doc.get("name"),
        split=split,
        text_field=text_field,
        template=template,
        revision=doc.get("revision"),
        load_kwargs=dict(load_kwargs),
    )


def _resolve_data_files(value: Any, where: str, base_dir: Path, local: bool) -> tuple[str, ...] | None:
    if value is None:
        return None
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ManifestError(f"{where}: 'data_files' must be a path or a list of paths")
    resolved: list[str] = []
    for entry in entries:
        if "://" in entry or not local:
            resolved.append(entry)  # remote or hub-relative: checked when loaded
            continue
        full = entry if Path(entry).is_absolute() else str(base_dir / entry)
        matches = sorted(glob.glob(full)) if glob.has_magic(full) else ([full] if Path(full).is_file() else [])
        if not matches:
            raise ManifestError(f"{where}: data file {entry!r} does not exist (resolved to {full!r})")
        resolved.extend(str(Path(m).resolve()) for m in matches)
    return tuple(resolved)


def template_fields(template: Any, where: str, key: str, example: str) -> tuple[str, ...]:
    """The column names a template fills, checked to be all it does: one rule for every template a manifest has.

    `str.format` accepts much more than `{column}`: a positional field (`{}`, `{0}`), an attribute or index
    (`{a.b}`, `{a[0]}`), a conversion (`{a!r}`) or a format spec (`{a:d}`, `{a:>10}`). Each would pass a
    syntax check and fail (or silently change the text) only when the first row is formatted, deep inside
    `pack`, `teacher-dump` or `rollout`. A row's columns are text: a template names them, nothing more.
    """
    if not isinstance(template, str):
        raise ManifestError(f"{where}: '{key}' must be a string naming fields, like {example}")
    try:  # an unbalanced brace raises ValueError while parsing
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ManifestError(f"{where}: '{key}' is not a format string ({exc}): write literal braces as {{{{ and }}}}") from None
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not name or name.isdigit() or any(c in name for c in ".["):  # positional, attribute or index
            raise ManifestError(f"{where}: '{key}' field {shown} is not a column name: name each column, like {example}"
                                " (literal braces are written {{ and }})")
        if conversion or spec:
            raise ManifestError(f"{where}: '{key}' field {shown} has a conversion or format spec; columns are inserted as text: "
                                f"write {{{name}}}")
        fields.append(name)
    if not fields:
        raise ManifestError(f"{where}: '{key}' must be a string naming fields, like {example}")
    return tuple(fields)


def reject_unknown(doc: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def positive_int(doc: dict, key: str, where: str, required: bool) -> int | None:
    if key not in doc:
        if required:
            raise ManifestError(f"{where}: missing required field {key!r}")
        return None
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ManifestError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value
