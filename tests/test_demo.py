"""The demo runs the whole job; without a data set it calibrates and evaluates on self text."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_model

import prunekit
from prunekit.demo import run_demo


def test_demo_without_data_uses_self_text(tmp_path, tokenizer):
    prunekit.save_model(tiny_model("llama", intermediate_size=256, max_position_embeddings=512), tokenizer,
                        tmp_path / "tiny")
    (tmp_path / "no-data").mkdir()
    summary = run_demo(str(tmp_path / "tiny"), tmp_path / "demo", data_dir=str(tmp_path / "no-data"),
                       calib_samples=4, calib_seq_len=32)
    assert summary["data"].startswith("self-sampled")
    assert 0.3 <= summary["removed"]["non-embedding"] < 0.45
    assert summary["perplexity"]["pruned"] > 0 and summary["speed"]["baseline"] is not None
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| perplexity (held-out text sampled from the dense model" in report
    reloaded, _ = prunekit.load(tmp_path / "demo" / "model")
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["saved"].endswith("model")
    assert prunekit.model_structure(reloaded).non_embedding_params < prunekit.model_structure(
        tiny_model("llama", intermediate_size=256, max_position_embeddings=512)).non_embedding_params


@pytest.mark.slow
def test_demo_on_the_embedded_model(tmp_path, shared_data_dir):
    summary = run_demo("smollm2-135m", tmp_path / "demo", data_dir=str(shared_data_dir) if shared_data_dir else None)
    assert 0.29 <= summary["removed"]["non-embedding"] < 0.33
    assert summary["perplexity"]["dense"] < summary["perplexity"]["pruned"] < 400
    assert summary["seconds"] < 600
