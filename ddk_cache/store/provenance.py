"""Library versions recorded in every store, so a cache can be reproduced or explained later."""

from __future__ import annotations

import platform
from importlib import metadata

RECORDED_PACKAGES = ("ddk-cache", "torch", "transformers", "tokenizers", "datasets", "zarr", "numcodecs", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
