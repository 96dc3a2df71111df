"""Stage two's pieces: the student, its losses on sparse targets, which windows it sees, and its run's state.

Losses (`losses`), DDK's domain weights (`domain_samplers`), the order of windows (`data_order`) and their
loading (`window_loader`, `cache_datasets` for other trainers), the student (`student`, `pruning`), its
parallelism (`distributed`, `parallelize`), optimiser (`optimizer`), checkpoint (`checkpoint`), numbers
(`metrics_log`; `stages/plot_run.py` draws them) and per-domain validation loss (`validation_loss`). Reads stores; never writes them.
"""
