"""ddk-cache: offline teacher logit caches for domain-guided distillation of LLMs.

Stage one (`teacher-dump`) writes the teacher's top-k next-token distributions into
a Zarr v3 store; stage two (`distill`) trains a student from that store alone.
"""

__version__ = "0.1.0"
