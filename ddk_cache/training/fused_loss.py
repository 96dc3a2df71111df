"""Losses from the student's final hidden states and its head, never holding `[tokens x vocabulary]` logits.

Why: every loss here is a sum over positions of a term that needs one position's logits (CE, the sparse KD
divergences, MiniLLM's terms). The dense path computes all `[N, V]` logits in float32, keeps them and their
log-softmax for the backward, then builds their gradient as large again: at V = 128k-262k and 8 x 4,096
tokens that is 16-34 GB each, where the loss keeps O(N x W).

How (Liger-Kernel's fused linear cross-entropy, here for any per-position loss, sparse teacher targets first):
`ChunkedHeadLoss` walks the tokens a chunk at a time. For each chunk it computes that chunk's logits with the
whole vocabulary, runs the *dense path's own code* on them (`losses.distillation_parts`, MiniLLM's terms),
takes that chunk's gradient with respect to its logits at once (a local backward over `[rows x V]`), and
turns it into the chunk's gradients of the hidden states and the head (two matmuls), which it keeps; the
chunk's logits are then freed. The backward only scales the kept gradients by the incoming one. So the
matmuls are the dense path's three (no recomputation), one chunk of logits is alive at a time, and the
numbers are the dense path's to float32 rounding: the same code computes them, row by row.

What it asks of a loss: to be a sum over chunks of rows, i.e. means must divide by a count known before the
chunks run (the masked positions, the response tokens). Everything else (which divergence, tail, temperature,
capture mode) is the dense code's business. The gradient it keeps is the one of its first output only; the
others (the logged parts) are detached statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddk_cache.lm_head import LMHead, map_rows, row_pieces, rows_per_chunk
from ddk_cache.training.losses import KDConfig, LossParts, TeacherTargets, _entries, _kd_per_position, _safe_ids, check_sampled_config, dense_parts

RowLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]  # (logits [n, V], rows) -> (loss, stats [k])
SparseRowLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]  # (lse, lse_t, at_ids, rows)


def _kept(ctx, grad_hidden, grad_weight, grad_bias, weight, bias) -> None:
    """The gradients a forward computed, kept for its backward (attributes, not saved tensors: the backward scales
    them in place and hands them over, so no second `[V, d]` buffer is made)."""
    ctx.grads = (grad_hidden, grad_weight, grad_bias)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def _handed_over(ctx, grad_total):
    if ctx.grads is None:
        raise RuntimeError("the fused loss's backward ran twice: it hands its gradients over once (no retain_graph)")
    (grad_hidden, grad_weight, grad_bias), ctx.grads = ctx.grads, None
    weight_dtype, bias_dtype = ctx.dtypes
    scaled = [None if g is None else (g if bool(grad_total == 1) else g.mul_(grad_total.to(g.dtype))) for g in (grad_hidden, grad_weight, grad_bias)]
    return scaled[0], scaled[1].to(weight_dtype), None if scaled[2] is None else scaled[2].to(bias_dtype)


def _add_chunk_gradient(g: torch.Tensor, h: torch.Tensor, weight_c: torch.Tensor, piece: slice, grads) -> None:
    """A chunk's gradient of its logits `[n, V]` into the hidden states' rows and the head's (and bias's) gradient."""
    grad_hidden, grad_weight, grad_bias = grads
    g_c = g.to(h.dtype)
    torch.mm(g_c, weight_c, out=grad_hidden[piece])
    if g_c.dtype == torch.float32:
        grad_weight.addmm_(g_c.t(), h)  # in place: the [V, d] buffer is read and written once per chunk
    else:
        grad_weight += (g_c.t() @ h).float()
    if grad_bias is not None:
        grad_bias += g.sum(0)


def _buffers(hidden, weight, bias):
    return (torch.empty_like(hidden), torch.zeros(weight.shape, device=weight.device, dtype=torch.float32),
            None if bias is None else torch.zeros(bias.shape, device=bias.device, dtype=torch.float32))


def _exp_shifted(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`z` `[n, V]` turned in place into exp(z - row max), with the rows' log-sum-exp and sums of that exp: the
    softmax is `z / sums` then, with no second `[n, V]` buffer (torch.logsumexp would allocate one)."""
    top = z.amax(-1, keepdim=True)
    sums = z.sub_(top).exp_().sum(-1)
    return z, top[:, 0] + sums.log(), sums


ChunkGradient = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (h, rows) -> (loss, stats, d logits)


def _chunked_forward(ctx, hidden, weight, bias, rows: int, chunk: ChunkGradient) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward both functions share: walk the token chunks, sum each chunk's loss and statistics, turn its logits'
    gradient into the hidden states' and the head's (kept for the backward)."""
    grads = _buffers(hidden, weight, bias)
    weight_c = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    total, stats = torch.zeros((), device=hidden.device), None
    for piece in row_pieces(hidden.shape[0], rows):
        h = hidden[piece]
        loss, chunk_stats, g = chunk(h, piece)
        total += loss.detach()
        stats = chunk_stats.detach() if stats is None else stats + chunk_stats.detach()
        _add_chunk_gradient(g, h, weight_c, piece, grads)
    _kept(ctx, *grads, weight, bias)
    ctx.mark_non_differentiable(stats)
    return total, stats


class SparseHeadLoss(torch.autograd.Function):
    """`sum over chunks of row_loss(lse, lse_t, logits at ids)`: what every loss on sparse targets needs of the head.

    Per token chunk: the chunk's logits `[n, V]` (one buffer), their log-sum-exp (at T = 1 and at T), and the
    logits at `ids` `[n, K]` (the label and the cached entries). `row_loss` turns these small tensors into the
    chunk's loss; its gradient with respect to them is taken at once, and the gradient of the logits is built
    in the same buffer: softmax x d lse (+ softmax at T x d lse_t / T) + the scattered d at_ids, through the
    model's scaling and soft-capping. Two matmuls then give the chunk's share of the hidden states' and the
    head's gradients, kept for the backward. One `[n, V]` buffer (two at T != 1) is the whole working set.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LMHead, ids, temperature: float, row_loss: SparseRowLoss, rows: int):
        def chunk(h: torch.Tensor, piece: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            chunk_ids = ids[piece]
            z = head.linear(h)
            slope = None
            if head.scale != 1.0:
                z.mul_(head.scale)
            if head.softcap is not None:
                z.div_(head.softcap).tanh_()
                slope = (1 - z * z).mul_(head.scale)  # d final / d linear = scale x (1 - tanh^2)
                z.mul_(head.softcap)
            at = z.gather(1, chunk_ids)
            tempered = None if temperature == 1.0 else _exp_shifted(z / temperature)
            probs, lse, sums = _exp_shifted(z)  # the logits' buffer, from here on their (unnormalised) softmax
            lse_t = lse if tempered is None else tempered[1]
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (lse, lse_t, at)]
                loss, chunk_stats = row_loss(*leaves, piece)
                g_lse, g_lse_t, g_at = (torch.zeros_like(leaf) if g is None else g
                                        for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True)))
            if tempered is None:
                g_lse = g_lse + g_lse_t
            g = probs.mul_((g_lse / sums)[:, None])  # softmax x d lse, in the same buffer
            if tempered is not None:  # d lse_t / d z = softmax(z / T) / T
                g += tempered[0].mul_((g_lse_t / (temperature * tempered[2]))[:, None])
            g.scatter_add_(1, chunk_ids, g_at)
            if slope is not None:
                g.mul_(slope)
            elif head.scale != 1.0:
                g.mul_(head.scale)
            return loss, chunk_stats, g

        return _chunked_forward(ctx, hidden, weight, bias, rows, chunk)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        return (*_handed_over(ctx, grad_total), None, None, None, None, None)


class ChunkedHeadLoss(torch.autograd.Function):
    """`sum over chunks of loss_of_rows(head.logits(hidden[rows]), rows)`, and the sum of its statistics: any loss
    that needs whole rows of logits (KD against a live teacher's full distribution), the dense code run per chunk.

    The gradient of each chunk's logits comes from a local backward through `loss_of_rows`; the rest is as
    `SparseHeadLoss`. Several `[n, V]` buffers (log-softmax and its gradient) are alive per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LMHead, loss_of_rows: RowLoss, rows: int):
        def chunk(h: torch.Tensor, piece: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z = head.linear(h)
            with torch.enable_grad():
                z.requires_grad_()
                loss, chunk_stats = loss_of_rows(head.finish(z), piece)
                (g,) = torch.autograd.grad(loss, z, allow_unused=True)
            return loss, chunk_stats, torch.zeros_like(z) if g is None else g

        return _chunked_forward(ctx, hidden, weight, bias, rows, chunk)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        return (*_handed_over(ctx, grad_total), None, None, None)


def _wants_grad(hidden: torch.Tensor, head: LMHead) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, head.weight, head.bias))


def _summed(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def chunked_head_loss(hidden: torch.Tensor, head: LMHead, loss_of_rows: RowLoss, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, stats)` summed over token chunks of `hidden` `[N, d]` (see `ChunkedHeadLoss`).

    Without a gradient to take (evaluation, `torch.no_grad()`, frozen head and body) the chunks are only summed.
    """
    rows = rows or rows_per_chunk(head.vocab)
    if _wants_grad(hidden, head):
        return ChunkedHeadLoss.apply(hidden, head.weight, head.bias, head, loss_of_rows, rows)
    return _summed(map_rows(hidden, head, loss_of_rows, rows))


def sparse_head_loss(hidden: torch.Tensor, head: LMHead, ids: torch.Tensor, row_loss: SparseRowLoss, temperature: float = 1.0,
                     rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, stats)` from `row_loss(lse, lse_t, logits at ids, rows)` over token chunks (see `SparseHeadLoss`);
    `ids` `[N, K]` int64 (the label first, then the cached entries, by convention of the callers)."""
    rows = rows or rows_per_chunk(head.vocab)
    if _wants_grad(hidden, head):
        return SparseHeadLoss.apply(hidden, head.weight, head.bias, head, ids, temperature, row_loss, rows)

    def rows_loss(z: torch.Tensor, piece: slice) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(z, -1)
        return row_loss(lse, lse if temperature == 1.0 else torch.logsumexp(z / temperature, -1), z.gather(1, ids[piece]), piece)

    return _summed(map_rows(hidden, head, rows_loss, rows))


def _counted(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Per-position weights that turn a sum over chunks into the dense path's mean (over the masked positions)."""
    if mask is None:
        return torch.full((n,), 1.0 / max(1, n), device=device)
    weights = mask.reshape(-1).float()
    return weights / weights.sum().clamp_min(1.0)


def fused_distillation_loss(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    teacher: TeacherTargets | None,
    config: KDConfig,
    teacher_vocab: int | None = None,
    mask: torch.Tensor | None = None,
    rows: int | None = None,
) -> LossParts:
    """`losses.distillation_loss` from the final hidden states `[..., d]` and the head: the same terms, means and mixing.

    Shapes as there: targets `[...]`, the teacher's entries `[..., W]`, mask `[...]`; `rows`: tokens per chunk.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    weights = _counted(mask, flat.shape[0], flat.device)
    ce_weight, kd_weight = (1.0, config.gamma) if config.form == "add" else (1 - config.mix, config.mix)
    if teacher is None or kd_weight == 0:
        def lm_rows(lse, _lse_t, at, piece):
            ce_sum = ((lse - at[:, 0]) * weights[piece]).sum()
            return ce_sum, ce_sum[None]

        total, stats = sparse_head_loss(flat, head, flat_targets[:, None], lm_rows, 1.0, rows)
        return LossParts(total=total, ce=stats[0], kd=None)
    entries = teacher.flat()
    ids, valid = _entries(entries, head.vocab)
    t = config.temperature

    def kd_rows(lse, lse_t, at, piece):  # the dense path's terms (`distillation_parts`) from what they need of the logits
        w = weights[piece]
        ce_sum = ((lse - at[:, 0]) * w).sum()
        s_top = at[:, 1:] / t - lse_t[:, None]
        kd_sum = (_kd_per_position(s_top, entries.rows(piece), valid[piece], config, head.vocab, teacher_vocab) * w).sum()
        return ce_weight * ce_sum + kd_weight * kd_sum, torch.stack([ce_sum, kd_sum])

    gathered = torch.cat([flat_targets[:, None], _safe_ids(ids, valid)], dim=-1)
    total, stats = sparse_head_loss(flat, head, gathered, kd_rows, t, rows)
    return LossParts(total=total, ce=stats[0], kd=stats[1])


def fused_online_loss(hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: LMHead,
                      config: KDConfig, rows: int | None = None) -> LossParts:
    """`losses.dense_distillation_loss` (KD against a live teacher's full distribution) with both heads applied a
    token chunk at a time: neither side's `[N, V]` logits are built."""
    flat, flat_teacher = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    weights = _counted(None, flat.shape[0], flat.device)
    ce_weight, kd_weight = (1.0, config.gamma) if config.form == "add" else (1 - config.mix, config.mix)

    def loss_of_rows(logits: torch.Tensor, piece: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = teacher_head.logits(flat_teacher[piece])
        ce, kd = dense_parts(logits, flat_targets[piece], teacher_logits, config)
        ce_sum, kd_sum = (ce * weights[piece]).sum(), (kd * weights[piece]).sum()
        return ce_weight * ce_sum + kd_weight * kd_sum, torch.stack([ce_sum, kd_sum])

    total, stats = chunked_head_loss(flat, head, loss_of_rows, rows or rows_per_chunk(max(head.vocab, teacher_head.vocab)) // 2)
    return LossParts(total=total, ce=stats[0], kd=stats[1])


def fused_kd_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module | LMHead,
    targets: TeacherTargets | dict,
    labels: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    tail: str = "rest",
    temperature: float = 1.0,
    gamma: float = 0.2,
    mask: torch.Tensor | None = None,
    teacher_vocab: int | None = None,
) -> LossParts:
    """CE + gamma x KD for your own trainer, from the final hidden states `[B, L, d]` and the LM head (a module or an
    `LMHead`), never building the `[B, L, V]` logits.

    `targets`: a `TeacherTargets` or a batch of `ddk_cache.collate` (its `teacher_*` keys, and its `labels` when
    `labels` is not given: the next token at each position). Take the hidden states with
    `ddk_cache.hidden_states(model, input_ids)` (the model's own forward, the head recorded instead of run), or
    `model.model(input_ids).last_hidden_state` for a model whose forward adds nothing after its head.
    `.total` is what to call `.backward()` on; `.ce` and `.kd` are detached parts to log.
    """
    config = KDConfig(divergence=divergence, tail=tail, temperature=temperature, gamma=gamma)  # validates
    teacher = targets if isinstance(targets, TeacherTargets) else TeacherTargets.from_batch(targets)
    if teacher.sampled:
        check_sampled_config(config)
    if labels is None:
        if isinstance(targets, TeacherTargets) or "labels" not in targets:
            raise ValueError("give labels (the next token at each position), or a batch of ddk_cache.collate, which has them")
        labels = targets["labels"]
    if hidden.shape[:-1] != teacher.ids.shape[:-1]:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and teacher entries {tuple(teacher.ids.shape)} cover different positions: "
                         "pass the hidden states of the batch's input_ids")
    head = lm_head if isinstance(lm_head, LMHead) else LMHead(lm_head.weight, getattr(lm_head, "bias", None))
    counted = labels.reshape(-1) >= 0
    if mask is not None:
        counted = counted & (mask.reshape(-1) > 0)
    return fused_distillation_loss(hidden, head, labels.clamp_min(0), teacher, config, teacher_vocab=teacher_vocab, mask=counted.float())
