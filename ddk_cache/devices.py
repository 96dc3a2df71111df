"""Which device `--device` names, checked once for every command (the teacher's engine, the student, evaluation),
and whether this process is the one that prints.

It sits below every sub-package (the HF engine and the training loop both need it) and imports only torch.
"""

from __future__ import annotations

import os

import torch

from ddk_cache.errors import DDKCacheError


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """The device `--device` names, checked: a one-line error instead of a CUDA traceback later."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise DDKCacheError(f"unknown --device {flag!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DDKCacheError(f"--device {flag} but no CUDA GPU is visible: use --device cpu (or auto)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DDKCacheError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPUs visible): check --device and --nproc-per-node")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DDKCacheError(f"--device {flag}: ddk-cache runs on cpu or cuda")
    return device


def is_main_process() -> bool:
    """Rank 0, or a process not launched by torchrun: the one that prints and writes shared files."""
    return os.environ.get("RANK", "0") == "0"
