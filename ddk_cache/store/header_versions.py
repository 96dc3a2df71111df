"""Which format version a store's header is, and the one parser that reads it: every reader and writer comes here.

The versions' classes never import each other's readers (as zarr-python's v2 and v3 metadata do not): version
2 is `header.py`, version 1 is an adapter into those classes (`header_v1.py`), and this module is the caller
that tells them apart. Everything that opens a store (the reader, the writer's resume, `pack`, node
coordination) parses through `parse_header`, so a store of an unknown version, or a Zarr store that is not a
ddk-cache store, is refused the same way everywhere; `HeaderError.not_ddk_cache` and `.damaged` let a caller
choose its own words without reading the message.
"""

from __future__ import annotations

from typing import Any

import zarr

from ddk_cache.store.format import DOMAIN_ATTR, HEADER_ATTR
from ddk_cache.store.header import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, DomainInfo, StoreHeader
from ddk_cache.store.header_v1 import header_from_v1
from ddk_cache.store.metadata import HeaderError


def parse_header(raw: Any) -> StoreHeader:
    """A header of any readable version as a `StoreHeader`; raises `HeaderError` naming what is wrong."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise HeaderError("is not a ddk-cache store (no 'ddk_cache' header)", damaged=False, not_ddk_cache=True)
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise HeaderError(f"has cache format version {version}; this ddk-cache reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
                          + ("upgrade ddk-cache" if newer else "re-create the store with teacher-dump"), damaged=False)
    return header_from_v1(raw) if version == 1 else StoreHeader.from_dict(raw)


def read_header(root: zarr.Group, url: str) -> StoreHeader:
    """The typed header of an open store; a damaged or unreadable one is refused in one line naming the store."""
    try:
        return parse_header(root.attrs.get(HEADER_ATTR))
    except HeaderError as exc:
        raise exc.at(url) from None


def read_domain_info(group: zarr.Group, url: str) -> DomainInfo:
    """A domain group's typed info, checked against its seal where it has one (KeyError if its attribute is
    missing: callers say what that means). The caller opens the group, as it already holds it or opens it its way."""
    raw = group.attrs[DOMAIN_ATTR]
    where = f"{group.basename}/{DOMAIN_ATTR}"
    try:
        info = DomainInfo.from_dict(raw, where)
        if info.sha256 is not None and info.sha256 != info.content_sha256():
            raise HeaderError(f"the domain attribute '{where}' does not match its sha256 (its sizes or teacher validation loss "
                              "were edited)")
    except HeaderError as exc:
        raise exc.at(url) from None
    return info


def write_domain_info(group: zarr.Group, info: DomainInfo) -> None:
    """The one writer of a domain's attribute: sealed, so a later edit of any key is found by every reader."""
    group.attrs[DOMAIN_ATTR] = info.sealed().to_dict()
