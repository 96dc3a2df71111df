"""The `ddk-cache` command line (installed as ddk_cache.cli): parses arguments, calls a stage."""
