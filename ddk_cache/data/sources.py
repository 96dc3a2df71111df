"""Turn a domain's manifest sources into documents (strings) with `datasets.load_dataset`.

Everything `load_dataset` accepts works: hub ids (which need hub access) and the local
builders `json`, `parquet`, `text`, `csv` with `data_files`. A row becomes one document,
either one column (`text_field`) or several joined by a `template`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

from ddk_cache.data.manifest import DomainSpec, SourceSpec
from ddk_cache.errors import ManifestError, first_line


def load_domain_documents(domain: DomainSpec) -> list[str]:
    """All non-blank documents of a domain, sources in manifest order, rows in file order."""
    documents: list[str] = []
    for index, source in enumerate(domain.sources):
        where = f"domain {domain.name!r} source {index} ({source.describe()})"
        documents.extend(_iter_source_documents(source, where))
    if not documents:
        raise ManifestError(f"domain {domain.name!r} has no text: its sources yielded no non-blank documents")
    return documents


def iter_domain_documents(domain: DomainSpec) -> Iterator[str]:
    """The same documents as `load_domain_documents`, streamed: never more than a batch of rows in memory.

    `datasets.load_dataset(..., streaming=True)` reads hub datasets and local json / parquet / text / csv
    files lazily, row by row, in file order.
    """
    for index, source in enumerate(domain.sources):
        yield from _iter_source_documents(source, f"domain {domain.name!r} source {index} ({source.describe()})", streaming=True)


def _iter_source_documents(source: SourceSpec, where: str, streaming: bool = False) -> Iterator[str]:
    """Why a temporary cache: a non-streaming `load_dataset` writes an Arrow copy of every source into the home
    directory's cache (`~/.cache/huggingface/datasets`), which fills home directories on shared clusters and is
    never read again here. It goes into a folder removed once the source is read, unless the user chose a cache
    with HF_DATASETS_CACHE."""
    if streaming or os.environ.get("HF_DATASETS_CACHE"):
        yield from _read_source(source, where, streaming, None)
        return
    with tempfile.TemporaryDirectory(prefix="ddk-datasets-") as cache:
        yield from _read_source(source, where, streaming, cache)


def iter_source_rows(source: SourceSpec, where: str, required_fields: tuple[str, ...]) -> Iterator[dict]:
    """The rows of one source (dicts of its columns), in file order, checked to have `required_fields`.

    For sources whose rows are not documents: prompt manifests take a prompt and a reference from each row.
    """
    with tempfile.TemporaryDirectory(prefix="ddk-datasets-") as cache:
        yield from _read_rows(source, where, False, None if os.environ.get("HF_DATASETS_CACHE") else cache, required_fields)


def _read_source(source: SourceSpec, where: str, streaming: bool, cache_dir: str | None) -> Iterator[str]:
    for row in _read_rows(source, where, streaming, cache_dir, source.required_fields):
        yield from _document(source, row)


def _read_rows(source: SourceSpec, where: str, streaming: bool, cache_dir: str | None, required_fields: tuple[str, ...]) -> Iterator[dict]:
    import datasets  # deferred: importing datasets costs a second, and --help should not pay it

    datasets.disable_progress_bars()  # one progress bar (ours) is enough

    kwargs = dict(source.load_kwargs)
    if source.data_files:
        kwargs["data_files"] = list(source.data_files)
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        if cache_dir is not None:
            kwargs.setdefault("cache_dir", cache_dir)
        dataset = datasets.load_dataset(source.path, source.config_name, split=source.split, streaming=streaming, **kwargs)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many types; the user needs the one-line reason
        decode = _unicode_error(exc)
        if decode is not None:
            raise ManifestError(f"{where}: the file is not UTF-8 text ({first_line(decode)}): convert it to UTF-8, "
                                "or give its encoding in the source's load_kwargs (e.g. {encoding: latin-1})") from None
        raise ManifestError(f"{where}: cannot load dataset: {first_line(exc)}") from None
    columns = list(first) if first is not None else list(dataset.column_names or [])
    missing = [f for f in required_fields if f not in columns]
    if missing and first is not None:
        raise ManifestError(
            f"{where}: text field {missing[0]!r} is not a column (columns: {', '.join(columns)}); fix 'text_field' or 'template'"
        )
    if first is not None:
        yield first
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: the file is not UTF-8 text ({first_line(exc)}): convert it to UTF-8, "
                            "or give its encoding in the source's load_kwargs (e.g. {encoding: latin-1})") from None


def _unicode_error(exc: BaseException | None) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind a datasets error (it wraps the reader's exception), if any."""
    while exc is not None:
        if isinstance(exc, UnicodeDecodeError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _document(source: SourceSpec, row: dict) -> Iterator[str]:
    """The row's text (its text field, or the template filled from its columns), if not blank."""
    text = source.template.format(**row) if source.template is not None else row[source.text_field]
    if isinstance(text, str) and text.strip():
        yield text
