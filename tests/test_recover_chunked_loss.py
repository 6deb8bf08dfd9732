"""Recovery takes its vocabulary-wide losses a chunk of positions at a time (prunekit.models.loss):
the chunked loss and its gradients equal those of the full logits, for cross-entropy and for
distillation (on the fly, with cross-entropy added, and from the top-k cache), on tied and untied
heads and Gemma's soft-capped logits; the loop trains to the same weights either way."""
from __future__ import annotations

import pytest
import torch

from prunekit.data.calibration import IGNORE_INDEX
from prunekit.models import loss as loss_module
from prunekit.recover import RecoveryData, RecoverySettings, losses, recover_loaded
from prunekit.recover import train as train_module
from tests.conftest import VOCAB, byte_tokenizer, tiny_model

ROWS_PER_CHUNK = 5  # 3 x 16 positions in 10 chunks, the last one short


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch, one_thread):
    monkeypatch.setitem(loss_module.LOSS_CHUNK_ELEMENTS, "cpu", ROWS_PER_CHUNK * VOCAB)


def _loss_and_gradients(student, teacher, settings, ids, labels, *, chunked: bool, cache=None):
    student.zero_grad(set_to_none=True)
    student.train()
    head = train_module.chunkable_head(student) if chunked else None
    target = train_module.next_tokens(labels)
    mask = target != IGNORE_INDEX
    rows = torch.arange(len(ids))
    output = train_module.final_hidden_states(student, ids, head)
    teacher_head = loss_module.product_head(loss_module.OutputHead.of(teacher)) if teacher is not None else None
    loss = train_module._training_loss(output, head, target, mask, ids, rows, teacher, teacher_head, cache, None,
                                       settings)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # untied head; tied and soft-capped
@pytest.mark.parametrize("method,options", [
    ("full", {}), ("distill", {}), ("distill", {"ce_weight": 0.5, "temperature": 2.0}),
    ("distill", {"teacher_cache": 7})], ids=["cross-entropy", "distill", "distill+ce-T2", "distill-top-k-cache"])
def test_chunked_loss_and_gradients_equal_the_full_logits(family, method, options):
    student, teacher = tiny_model(family), tiny_model(family, seed=1)
    student.requires_grad_(True)
    ids = torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 5:9] = IGNORE_INDEX
    settings = RecoverySettings(method=method, **options)
    cache = None
    if options.get("teacher_cache"):
        with torch.no_grad():
            values, indices = losses.top_k_logits(teacher(input_ids=ids).logits, options["teacher_cache"])
        cache = (values.bfloat16(), indices)
    full, full_grads = _loss_and_gradients(student, teacher, settings, ids, labels, chunked=False, cache=cache)
    chunked, chunked_grads = _loss_and_gradients(student, teacher, settings, ids, labels, chunked=True, cache=cache)
    assert train_module.chunkable_head(student) is not None
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert chunked_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_loop_trains_to_the_same_weights_with_the_chunked_loss(tmp_path, monkeypatch):
    """Three distillation steps with cross-entropy added, and the held-out perplexity, chunked and on
    full logits (chunkable_head answering None makes every loss take the full logits)."""
    text = tmp_path / "train.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. A bird sat on the wire and sang. " * 40)
    settings = RecoverySettings(method="distill", ce_weight=0.3, tokens=32 * 4 * 3, batch_size=4, lr=3e-3,
                                eval_every=0, checkpoint_every=0, data=RecoveryData(source=str(text), seq_len=32,
                                                                                    held_out=2))
    runs = []
    for chunked in (True, False):
        if not chunked:
            monkeypatch.setattr(train_module, "chunkable_head", lambda model: None)
        model, record = recover_loaded(tiny_model("gemma2"), byte_tokenizer(), settings, teacher=tiny_model("gemma2",
                                       seed=1), progress=False)
        runs.append((model.state_dict(), record))
    (chunked_state, chunked_record), (full_state, full_record) = runs
    assert chunked_record["loss"] == pytest.approx(full_record["loss"], rel=1e-4)
    assert [p for _, p in chunked_record["eval"]] == pytest.approx([p for _, p in full_record["eval"]], rel=1e-4)
    for name, value in full_state.items():
        torch.testing.assert_close(chunked_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_head_that_lora_adapts_takes_the_full_logits():
    student = train_module._with_lora(tiny_model("llama"), RecoverySettings(method="lora",
                                                                            lora_targets=("q_proj", "lm_head")))
    assert train_module.chunkable_head(student) is None
    plain = train_module._with_lora(tiny_model("llama"), RecoverySettings(method="lora"))
    assert train_module.chunkable_head(plain) is not None


def test_under_autocast_where_it_applies_the_head_product_takes_the_autocast_dtype(monkeypatch):
    """On a GPU, bf16 autocast (recovery's bf16 precision) gives the chunked head's product in bf16,
    as it gave the full logits: the CPU is made such a device here, since the test has no GPU. The
    loss then equals the loss of the bf16 product's logits, and the gradients keep the
    weights' dtype; without autocast the product stays in float32."""
    from torch.nn import functional as F

    monkeypatch.setattr(loss_module, "AUTOCAST_PRODUCT_DEVICES", {"cuda", "cpu"})
    torch.manual_seed(4)
    hidden = torch.randn(12, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(64, (12,))
    weights = torch.full((12,), 1 / 12)
    head = loss_module.OutputHead(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_module.autocast_product_dtype("cpu") == torch.bfloat16
        lowered = loss_module.chunked_head_loss(head, hidden, losses.weighted_cross_entropy, targets, weights, rows=5)
    lowered.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    rounded = F.linear(hidden.detach().bfloat16(), weight.detach().bfloat16()).double()
    expected = F.cross_entropy(rounded, targets)
    assert lowered.item() == pytest.approx(expected.item(), rel=1e-5)
    exact = F.cross_entropy(F.linear(hidden.detach().double(), weight.detach().double()), targets)
    plain = loss_module.chunked_head_loss(head, hidden, losses.weighted_cross_entropy, targets, weights, rows=5)
    assert plain.item() == pytest.approx(exact.item(), rel=1e-6)
    teacher = loss_module.product_head(head, torch.bfloat16)
    assert teacher.weight.dtype == torch.float32  # a CPU head is never lowered by product_head
