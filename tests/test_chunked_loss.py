"""The chunked float32 next-token loss (prunekit.models.loss) equals the full loss and its
gradients (float64 references), and what uses it gives what it gave before."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_model
from prunekit.models.loss import (IGNORE_INDEX, OutputHead, chunked_head_loss, loss_working_bytes, next_token_loss,
                                  token_nll)


def _reference_loss(hidden, weight, bias, labels, softcap=None):
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum") / (targets != IGNORE_INDEX).sum()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_loss(softcap, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    labels = torch.randint(50, (3, 11))
    labels[1, 4:7] = IGNORE_INDEX
    head = OutputHead(weight, bias, softcap)
    loss = next_token_loss(head, hidden, labels, rows=4)  # 30 positions in 8 chunks, the last one short
    loss.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    reference = _reference_loss(hidden, weight, bias, labels, softcap)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, t in zip(grads, [t for t in (hidden, weight, bias) if t is not None]):
        torch.testing.assert_close(got.double(), t.grad.double(), rtol=1e-5, atol=1e-7)


def test_only_what_needs_a_gradient_gets_one_and_a_frozen_head_gets_none():
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen, as in Taylor scoring
    labels = torch.randint(20, (2, 6))
    loss = next_token_loss(OutputHead(weight), hidden, labels, rows=3) * 3.0  # grad_output != 1 is honoured
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    (3.0 * _reference_loss(reference_hidden, weight, None, labels)).backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad.double(), reference_hidden.grad.double(), rtol=1e-5, atol=1e-7)


def test_bfloat16_weights_take_a_float32_loss_on_the_cpu():
    """bf16 weights and hidden states: the head's product runs in float32, so the loss equals the
    float64 loss of the same bf16 values (a bf16 product would be off by about 1%)."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 32).bfloat16().requires_grad_(True)
    weight = torch.randn(300, 32).bfloat16()
    labels = torch.randint(300, (2, 9))
    loss = next_token_loss(OutputHead(weight), hidden, labels, rows=5)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(_reference_loss(hidden.detach(), weight, None, labels).item(), rel=1e-6)


def test_a_generic_loss_of_logits_is_chunked_too():
    """KL to a teacher's logits, given per position: the sum over chunks is the whole sum."""
    torch.manual_seed(3)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    teacher = torch.randn(10, 30)

    def kl(logits, teacher_logits):
        t = F.log_softmax(teacher_logits, -1)
        return (t.exp() * (t - F.log_softmax(logits, -1))).sum()

    chunked = chunked_head_loss(OutputHead(weight), hidden, kl, teacher, rows=3)
    chunked.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    kl(reference_hidden @ weight.T, teacher).backward()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)


def test_token_nll_equals_the_model_logits_loss():
    model = tiny_model("gemma2")  # final logit soft-capping
    ids = torch.randint(300, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.base_model(ids).last_hidden_state
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    got = token_nll(OutputHead.of(model), hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1), rows=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_working_memory_is_one_chunk_not_the_vocabulary_times_the_batch():
    # Gemma 3's vocabulary at 8 x 512 positions: the full logits would be 4.3 GB in float32.
    held = loss_working_bytes(262_144, 640, 8 * 512, dtype_bytes=4, gradients=True)
    assert held < 300 * 2**20


def test_taylor_of_a_128k_vocabulary_in_bfloat16_on_the_cpu_takes_seconds():
    """The issue's case: a 4-layer random model with a 128,256-token vocabulary (hidden 256) loaded
    in bf16, Taylor-scored on 4 x 512 tokens on the CPU, took 682 s with the loss in bf16; the
    chunked float32 loss takes seconds (4.5 s for this test on the project's 2-core CPU)."""
    import time

    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.score import score_model

    config = AutoConfig.for_model("llama", vocab_size=128_256, hidden_size=256, intermediate_size=768,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(128_256, (4, 512), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    scores = score_model(model, "taylor", ids, batch_size=8, progress=False)
    assert time.perf_counter() - started < 20
    assert all(torch.isfinite(v).all() for v in scores.values["channel"])
