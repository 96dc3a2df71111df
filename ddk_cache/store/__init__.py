"""The cache's format and everything that reads or writes it: one Zarr v3 store per teacher-dump.

`format` names the arrays and codecs (docs/cache-format.md is its prose twin); `header` (+ `header_v1`, read
only) is the typed root metadata; `capture` what is kept per position; `writer` / `lease` write shards, one
writer per place; `integrity` checksums them; `reader` / `api` read them back (`open_store`); `fingerprints`
and `provenance` record what made the cache. It imports nothing from `training` or `minillm`.
"""
