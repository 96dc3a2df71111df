"""The two jobs of ddk-cache, as orchestration over the core library (installed as ddk_cache.stages)."""
