"""From a data manifest to packed token windows: which text, from where, how much, split how.

`manifest` (the YAML), `sources` (its sources as documents, through `datasets`), `packing` (tokenize, split by
document, pack a domain in memory), `streamed_packing` (the same in bounded memory), `demo_corpus`.
"""
