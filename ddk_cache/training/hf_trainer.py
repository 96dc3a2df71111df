"""The Hugging Face `Trainer`, distilling from a cache: CE + gamma x KD, right under accumulation and many ranks.

Why a class of ours, when a 10-line `compute_loss` override trains: that override is wrong as soon
as `gradient_accumulation_steps > 1`. The Trainer divides a custom loss by the accumulation steps
only when it believes the loss is not already normalised, and it believes that whenever the model's
`forward` takes `**kwargs` (every causal LM in transformers 5 does): the override's per-micro-batch
mean then reaches the optimizer 4x too large at 4 steps (logged 48.3 instead of 12.2). And the
Trainer's own token count (`num_items_in_batch`) counts `labels[..., 1:]`, one position short per
row, because it assumes labels a model will shift; a cache's labels are already shifted.

So `KDTrainer` owns the normalisation, the way transformers' own losses do it: each micro-batch
returns its *sum* over positions divided by the positions of the whole optimizer step (every
micro-batch of it, and every rank's when `average_tokens_across_devices`, times the world size that
DDP's gradient averaging divides by again). The step's loss and gradients are then the mean over
its positions whatever the split into micro-batches and ranks, and `loss_is_scaled_for_ga` tells the
Trainer not to divide again. Batches from `ddk_cache.collate` hold tensors only, so accelerate can
dispatch them to several ranks; `remove_unused_columns` is turned off, or the Trainer would drop the
`teacher_*` columns a `datasets` view carries.

The loss is the fused one (`fused_loss.py`): the model's forward runs with its head recorded, not applied
(`lm_head.hidden_states`), and CE + KD take the head a token chunk at a time, so a 128k-262k vocabulary
never costs `[tokens x vocabulary]` float32 logits and their gradient. `loss_impl="dense"` keeps the
plain logits path, the reference. Evaluation that asks for outputs (`prediction_loss_only=False`) gets
the logits, built once for that.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ddk_cache.choices import LossImpl, parse_choice
from ddk_cache.errors import SettingError
from ddk_cache.training.cache_datasets import collate
from ddk_cache.training.losses import Divergence, KDConfig, TailMode, TeacherTargets, check_sampled_config
from ddk_cache.training.objectives import KDObjective
from ddk_cache.training.student_outputs import student_outputs

IGNORE_INDEX = -100  # transformers' label for a position that is not a target


def target_positions(batch: dict[str, Any]) -> int:
    """The positions of a batch that count in the loss (labels that are not -100)."""
    return int(batch["labels"].ne(IGNORE_INDEX).sum())


def _used_parameters_only(args: tuple, kwargs: dict[str, Any]) -> None:
    """Tell DDP every parameter is used, before the Trainer builds its accelerator.

    The fused loss applies the head after the forward: DDP's search for unused parameters (the Trainer's default
    without gradient checkpointing) would mark the head unused at the forward's end, then fail when its
    gradient arrives ("Expected to mark a variable ready only once").
    """
    from transformers import TrainingArguments

    if len(args) < 2 and kwargs.get("args") is None:
        kwargs["args"] = TrainingArguments(output_dir="tmp_trainer")  # what the Trainer builds itself when given none
    training_args = args[1] if len(args) >= 2 else kwargs["args"]
    if training_args.ddp_find_unused_parameters:
        raise SettingError("ddp_find_unused_parameters=True cannot work with the fused loss (it applies the head after the "
                           "forward): leave it unset, or pass loss_impl='dense'")
    training_args.ddp_find_unused_parameters = False


class KDTrainer(Trainer):
    """`Trainer` whose loss is CE on the next token + `gamma` x KD against the cache's teacher entries.

    Use it as the Trainer, with a `CacheMixture` / `CacheDataset` (or `to_iterable_dataset`'s view)
    as `train_dataset`; `data_collator` defaults to `ddk_cache.collate`. The KD settings are
    `kd_loss`'s (DDK: forward KL, rest tail, T = 1, gamma = 0.2). `kd_history` keeps each
    micro-batch's KD term (the mean over its positions) for inspection.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the step's positions itself (module docstring)

    def __init__(self, *args: Any, gamma: float = 0.2, divergence: Divergence = "forward_kl", tail: TailMode = "rest",
                 temperature: float = 1.0, loss_impl: LossImpl | str = LossImpl.fused, **kwargs: Any) -> None:
        self.kd = KDConfig(divergence=divergence, tail=tail, temperature=temperature, gamma=gamma)  # validates before the model loads
        self.loss_impl = parse_choice(LossImpl, loss_impl, "loss_impl")
        kwargs.setdefault("data_collator", collate)
        if self.loss_impl == LossImpl.fused:
            _used_parameters_only(args, kwargs)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # keep the teacher_* columns (read when the dataloader is built): compute_loss needs them
        # older transformers have no loss_is_scaled_for_ga: they skip the division (and count items) when the model takes
        # loss kwargs, which this loss does in effect
        self.model_accepts_loss_kwargs = True
        self.kd_history: list[float] = []

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches, and the positions they hold (over every rank when the Trainer averages over them)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        positions = torch.tensor(sum(target_positions(batch) for batch in batches), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            positions = self.accelerator.gather(positions).sum()
        return batches, positions

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        outputs = student_outputs(model, inputs["input_ids"], self.loss_impl)  # labels are already shifted: not given to the model
        labels = inputs["labels"]
        counted = labels.ne(IGNORE_INDEX)
        positions = counted.sum()
        teacher = TeacherTargets.from_batch(inputs)
        if teacher.sampled:
            check_sampled_config(self.kd)
        parts = KDObjective(self.kd, teacher_vocab=None).loss_on(outputs, labels.clamp_min(0), teacher, counted.float())
        self.kd_history.append(float(parts.kd))
        loss = parts.total  # the micro-batch's mean over its positions
        if num_items_in_batch is not None and model.training:  # training: a share of the step's mean (module docstring)
            loss = loss * positions / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size
        if not return_outputs:
            return loss
        return loss, {"logits": outputs.logits if not outputs.fused else outputs.head.logits(outputs.hidden.flatten(0, 1)).reshape(
            *outputs.hidden.shape[:-1], -1)}
