"""The fused sparse loss equals the dense path (logits built, then `distillation_loss`) in value and in gradients with
respect to the hidden states, the head weight and its bias, for every divergence, tail and temperature, with
masks, dropped entries, sampled targets, tied heads, soft-capping and chunks that do not divide the sizes; and the
hidden states `lm_head.hidden_states` records give the model's own logits (issue 26)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddk_cache.lm_head import LMHead, hidden_states
from ddk_cache.training.fused_loss import fused_distillation_loss, fused_online_loss
from ddk_cache.training.losses import DIVERGENCES, TAIL_MODES, KDConfig, TeacherTargets, dense_distillation_loss, distillation_loss

N, D, V, W = 37, 12, 101, 6  # sizes the chunks (5 tokens) do not divide


def problem(seed: int, sampled: bool = False, with_valid: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    ids = torch.stack([torch.randperm(V + 4, generator=g)[:W] for _ in range(N)]).sort(-1).values  # some ids beyond V: dropped
    logprobs = torch.log_softmax(torch.randn(N, W, generator=g) * 2, -1) - 0.2  # entries short of 1: a rest
    rest = torch.log1p(-logprobs.exp().sum(-1).clamp(max=0.999))
    valid = (torch.rand(N, W, generator=g) > 0.2) if with_valid else None
    if sampled:
        counts = torch.randint(0, 5, (N, W), generator=g).float()
        counts[:, 0] += 1
        logprobs, rest = torch.log(counts / counts.sum(-1, keepdim=True)), None
        valid = counts > 0
    teacher = TeacherTargets(ids, logprobs, valid, rest, sampled)
    mask = (torch.rand(N, generator=g) > 0.3).float()
    return hidden, weight, bias, labels, teacher, mask


def dense_and_fused(config: KDConfig, seed: int, **kinds):
    hidden, weight, bias, labels, teacher, mask = problem(seed, **kinds)
    results = []
    for fused in (False, True):
        for tensor in (hidden, weight, bias):
            tensor.grad = None
        if fused:
            parts = fused_distillation_loss(hidden, LMHead(weight, bias), labels, teacher, config, mask=mask, rows=5)
        else:
            parts = distillation_loss(hidden @ weight.t() + bias, labels, teacher, config, mask=mask)
        parts.total.backward()
        results.append((parts, [t.grad.clone() for t in (hidden, weight, bias)]))
    return results


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item())), (a - b).abs().max().item()


CASES = list(itertools.product(DIVERGENCES, TAIL_MODES, (1.0, 2.0)))


@pytest.mark.parametrize(("divergence", "tail", "temperature"), CASES)
def test_fused_equals_dense_for_every_divergence_tail_and_temperature(divergence, tail, temperature):
    config = KDConfig(divergence=divergence, tail=tail, temperature=temperature, gamma=0.7)
    (dense, dense_grads), (fused, fused_grads) = dense_and_fused(config, seed=CASES.index((divergence, tail, temperature)), with_valid=True)
    for name in ("total", "ce", "kd"):
        assert_close(getattr(fused, name), getattr(dense, name))
    for a, b in zip(fused_grads, dense_grads):
        assert_close(a, b)


def test_fused_equals_dense_on_sampled_targets_in_the_mixed_form_and_without_kd():
    for config, kinds in ((KDConfig(), {"sampled": True}), (KDConfig(form="mix", mix=0.5), {}), (KDConfig(gamma=0.0), {})):
        (dense, dense_grads), (fused, fused_grads) = dense_and_fused(config, seed=3, **kinds)
        assert_close(fused.total, dense.total)
        for a, b in zip(fused_grads, dense_grads):
            assert_close(a, b)


def test_a_tied_head_without_a_bias_with_soft_capping_and_scaling():
    """The gradient into an embedding matrix the head shares (it reaches it twice), through Gemma's cap and a scale."""
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, D, generator=g).requires_grad_()
    tokens, labels = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)
    teacher = problem(1)[4]
    config = KDConfig(divergence="jsd", temperature=2.0)
    results = []
    for fused in (True, False):
        embedding.grad = None
        head = LMHead(embedding, None, softcap=3.0, scale=0.7)
        hidden = torch.nn.functional.embedding(tokens, embedding) * 0.5
        if fused:
            parts = fused_distillation_loss(hidden, head, labels, teacher, config, rows=4)
        else:
            parts = distillation_loss(torch.tanh(hidden @ embedding.t() * 0.7 / 3.0) * 3.0, labels, teacher, config)
        parts.total.backward()
        results.append((parts.total.detach(), embedding.grad.clone()))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])


def test_online_kd_from_both_heads_equals_the_dense_reference():
    hidden, weight, bias, labels, _, _ = problem(5)
    g = torch.Generator().manual_seed(9)
    teacher_hidden, teacher_weight = torch.randn(N, 7, generator=g), torch.randn(V - 3, 7, generator=g)  # a smaller teacher vocabulary
    config = KDConfig(divergence="reverse_kl", temperature=1.5)
    results = []
    for fused in (True, False):
        for t in (hidden, weight, bias):
            t.grad = None
        if fused:
            parts = fused_online_loss(hidden, LMHead(weight, bias), labels, teacher_hidden, LMHead(teacher_weight), config, rows=6)
        else:
            parts = dense_distillation_loss(hidden @ weight.t() + bias, labels, teacher_hidden @ teacher_weight.t(), config)
        parts.total.backward()
        results.append((parts, [t.grad.clone() for t in (hidden, weight, bias)]))
    for name in ("total", "ce", "kd"):
        assert_close(getattr(results[0][0], name), getattr(results[1][0], name))
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b)


def test_no_gradient_wanted_sums_the_chunks_only():
    hidden, weight, bias, labels, teacher, mask = problem(2)
    with torch.no_grad():
        fused = fused_distillation_loss(hidden, LMHead(weight, bias), labels, teacher, KDConfig(), mask=mask, rows=5)
        dense = distillation_loss(hidden @ weight.t() + bias, labels, teacher, KDConfig(), mask=mask)
    assert not fused.total.requires_grad
    assert_close(fused.total, dense.total)


ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 5.0, "head_dim": 8}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 1, "n_head": 2}),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_recorded_hidden_states_and_the_head_give_the_models_own_logits(architecture):
    """Through each family's post-processing (soft-capping, scaling), tied or untied, the recorded input of the head
    and `LMHead.of` give what the forward's logits are; the forward runs whole and the head is restored after."""
    import transformers

    name, extra = ARCHITECTURES[architecture]
    sizes = {} if architecture == "gpt2" else {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "num_key_value_heads": 2}
    config = getattr(transformers, name)(vocab_size=97, **sizes, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits.float()
        hidden, head = hidden_states(model, tokens)
        again = model(input_ids=tokens, use_cache=False).logits.float()
    assert hidden.shape == (2, 9, model.config.get_text_config().hidden_size if architecture != "gpt2" else 32)
    assert torch.allclose(head.logits(hidden.reshape(-1, hidden.shape[-1])).reshape(expected.shape), expected, atol=1e-5)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_from_the_hidden_states_equals_the_dense_update(single_step):
    """Policy gradient (clipped, whitened advantages) + single-step reverse KL, with a response mask and prompt positions."""
    from ddk_cache.minillm.objective import MiniLLMConfig, fused_minillm_loss, minillm_loss

    hidden, weight, bias, labels, teacher, mask = problem(7)
    b, l = 1, N  # one sequence of N positions
    g = torch.Generator().manual_seed(3)
    teacher_lp, behaviour = -3 * torch.rand(b, l, generator=g), -3 * torch.rand(b, l, generator=g)
    teacher = TeacherTargets(teacher.ids[None], teacher.logprobs[None], None, teacher.rest[None])
    config = MiniLLMConfig(clip=0.1, single_step=single_step)
    results = []
    for fused in (True, False):
        for t in (hidden, weight, bias):
            t.grad = None
        if fused:
            parts = fused_minillm_loss(hidden[None], LMHead(weight, bias), labels[None], teacher, teacher_lp, behaviour, mask[None], config, rows=6)
        else:
            parts = minillm_loss((hidden @ weight.t() + bias)[None], labels[None], teacher, teacher_lp, behaviour, mask[None], config)
        parts.total.backward()
        results.append((parts, [t.grad.clone() for t in (hidden, weight, bias)]))
    for name in ("total", "policy_gradient", "single_step", "reward", "reverse_kl", "clipped_fraction"):
        assert_close(getattr(results[0][0], name), getattr(results[1][0], name))
    for a, b_ in zip(results[0][1], results[1][1]):
        assert_close(a, b_)


def test_an_adapter_on_the_head_is_refused_not_ignored():
    """peft's LoRA on lm_head wraps it: its weight alone is the base head, so the fused loss would train as if the
    adapter were not there. Refused in one line; an adapter elsewhere is fine."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.errors import SettingError

    def student():
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2))

    tokens = torch.randint(0, 97, (2, 5))
    adapted = peft.get_peft_model(student(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(SettingError, match="adapter on its head"):
        hidden_states(adapted, tokens)
    body_only = peft.get_peft_model(student(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    hidden, head = hidden_states(body_only, tokens)
    assert hidden.shape == (2, 5, 32) and head.vocab == 97
