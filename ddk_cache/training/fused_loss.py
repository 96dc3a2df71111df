"""CE + KD on sparse teacher targets from the student's hidden states, never building `[tokens x vocabulary]` logits.

Why: a loss on a sparse cache needs, per position, only three things from the student's head: the
log-sum-exp of its logits over the vocabulary (at T = 1 for CE, at T for KD), its logit at the label,
and its logits at the W cached ids. The dense path (`losses.distillation_loss`) computes all V logits
in float32, keeps them for the backward, and keeps their gradient as large again: at V = 128k-262k
and 8 x 4,096 tokens that is 16-34 GB each, where these three things are O(tokens x W).

How: the log-sum-exp is a custom autograd function over vocabulary chunks. Its forward keeps a running
log-sum-exp, chunk by chunk; its backward recomputes each chunk's logits, turns them into that chunk's
softmax, and adds `softmax x grad` into the hidden states' and the head's gradients (Cut Cross-Entropy's
idea, here for sparse teacher targets). Peak memory is one chunk, `[tokens x chunk]`, in both passes.
The logits at the label and at the cached ids come from the head's rows, token chunk by token chunk, and
their gradient goes back into those rows (an index_add into the one `[V, d]` gradient buffer), so the
`[tokens x W x d]` rows are not kept either. Everything
after that is the dense path's own code (`_kd_per_position`, `_combine`) on the same `[N, W]` student
log-probs, so the two paths agree to float32 rounding for every divergence, tail, temperature and capture.
"""

from __future__ import annotations

import math

import torch

from ddk_cache.training.losses import KDConfig, LossParts, TeacherTargets, _combine, _entries, _kd_per_position, _mean, _safe_ids

CHUNK_ELEMENTS = 1 << 24  # one vocabulary chunk's logits, [tokens x chunk] float32: 64 MiB, whatever the tokens
TOKEN_CHUNK = 1024  # rows of the head gathered at a time for the cached ids: [1024 x W x d]


def vocab_chunk_for(tokens: int, vocab: int) -> int:
    """Ids per vocabulary chunk: CHUNK_ELEMENTS logits at a time, at least 256 ids (the matmul stays efficient)."""
    return max(256, min(vocab, CHUNK_ELEMENTS // max(1, tokens)))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    logits = hidden @ weight[start:stop].t()
    if bias is not None:
        logits = logits + bias[start:stop]
    return logits.float()


def _row_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """The logits at `ids` `[n, K]` from the head's rows `[n, K, d]` (one token chunk)."""
    logits = torch.einsum("nd,nkd->nk", hidden, weight[ids]).float()
    return logits if bias is None else logits + bias[ids].float()


class SparseHead(torch.autograd.Function):
    """What a sparse loss needs of the LM head, without `[N, V]` logits: `(lse, lse_t, logits at ids)`.

    `lse` `[N]` = logsumexp over the vocabulary of the logits, `lse_t` `[N]` the same of logits / T, `at_ids`
    `[N, K]` the logits at `ids`. The forward runs over vocabulary chunks (a running log-sum-exp) and token
    chunks (the head's rows at the ids); the backward recomputes each vocabulary chunk's logits to turn them
    into softmax x gradient, and scatters the gradient of the gathered logits into the head's rows it came
    from. The head's gradient is one `[V, d]` buffer, as the dense path's is.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature: float, vocab_chunk: int, token_chunk: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        lse = torch.full((n,), -math.inf, device=hidden.device)
        lse_t = lse.clone()
        for start in range(0, vocab, vocab_chunk):
            logits = _chunk_logits(hidden, weight, bias, start, start + vocab_chunk)
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            if temperature != 1.0:
                lse_t = torch.logaddexp(lse_t, (logits / temperature).logsumexp(-1))
        if temperature == 1.0:
            lse_t = lse
        at_ids = torch.cat([_row_logits(hidden[i:i + token_chunk], weight, bias, ids[i:i + token_chunk]) for i in range(0, n, token_chunk)])
        ctx.save_for_backward(hidden, weight, bias, ids, lse, lse_t)
        ctx.settings = (temperature, vocab_chunk, token_chunk)
        return lse, lse_t.clone() if temperature == 1.0 else lse_t, at_ids

    @staticmethod
    def backward(ctx, grad_lse, grad_lse_t, grad_at_ids):
        hidden, weight, bias, ids, lse, lse_t = ctx.saved_tensors
        temperature, vocab_chunk, token_chunk = ctx.settings
        n, vocab = hidden.shape[0], weight.shape[0]
        h = hidden.float()
        grad_hidden = torch.zeros_like(h)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros(vocab, device=bias.device, dtype=torch.float32)
        for start in range(0, vocab, vocab_chunk):  # d lse / d logits = softmax (at T: softmax of logits / T, over T)
            stop = min(start + vocab_chunk, vocab)
            logits = _chunk_logits(hidden, weight, bias, start, stop)
            if temperature == 1.0:  # lse_t is lse: one softmax serves both gradients
                g = torch.exp(logits - lse[:, None]) * (grad_lse + grad_lse_t)[:, None]
            else:
                g = torch.exp(logits - lse[:, None]) * grad_lse[:, None]
                g = g + torch.exp(logits / temperature - lse_t[:, None]) * (grad_lse_t[:, None] / temperature)
            grad_hidden += g @ weight[start:stop].float()
            grad_weight[start:stop] = g.t() @ h
            if grad_bias is not None:
                grad_bias[start:stop] = g.sum(0)
        for i in range(0, n, token_chunk):  # the gathered logits: each gradient goes back to the row it came from
            rows, g = ids[i:i + token_chunk], grad_at_ids[i:i + token_chunk].float()
            grad_hidden[i:i + token_chunk] += torch.einsum("nk,nkd->nd", g, weight[rows].float())
            grad_weight.index_add_(0, rows.reshape(-1), (g[..., None] * h[i:i + token_chunk, None, :]).reshape(-1, h.shape[1]))
            if grad_bias is not None:
                grad_bias.index_add_(0, rows.reshape(-1), g.reshape(-1))
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def sparse_head(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None, temperature: float = 1.0,
                vocab_chunk: int | None = None, token_chunk: int = TOKEN_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(lse, lse_t, logits at ids)` of `hidden @ weight.T + bias` (see `SparseHead`); `ids` `[N, K]` int64."""
    chunk = vocab_chunk or vocab_chunk_for(hidden.shape[0], weight.shape[0])
    return SparseHead.apply(hidden, weight, bias, ids, temperature, chunk, token_chunk)


def fused_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTargets | None,
    config: KDConfig,
    bias: torch.Tensor | None = None,
    teacher_vocab: int | None = None,
    mask: torch.Tensor | None = None,
    vocab_chunk: int | None = None,
    token_chunk: int = TOKEN_CHUNK,
) -> LossParts:
    """`losses.distillation_loss` from the final hidden states `[..., d]` and the LM head (`weight` `[V, d]`, `bias` `[V]`).

    The same terms, means and mixing as the dense path, given what it would compute the logits from:
    `logits = hidden @ weight.T + bias`. Shapes otherwise as there: targets `[...]`, entries `[..., W]`,
    mask `[...]`.
    """
    vocab = weight.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1, 1).long()
    weights = None if mask is None else mask.reshape(-1).float()
    kd_weight = config.gamma if config.form == "add" else config.mix
    if teacher is None or kd_weight == 0:
        lse, _, at_label = sparse_head(flat, weight, flat_targets, bias, 1.0, vocab_chunk, token_chunk)
        ce = _mean(lse - at_label[:, 0], weights)
        return LossParts(total=ce, ce=ce, kd=None)
    ids, valid = _entries(teacher, vocab)
    t = config.temperature
    lse, lse_t, logits = sparse_head(flat, weight, torch.cat([flat_targets, _safe_ids(ids, valid)], dim=-1), bias, t, vocab_chunk, token_chunk)
    ce = _mean(lse - logits[:, 0], weights)
    s_top = logits[:, 1:] / t - lse_t[:, None]
    kd = _mean(_kd_per_position(s_top, teacher, valid, config, vocab, teacher_vocab), weights)
    return _combine(ce, kd, config)
