"""`prunekit prune --prune-structures expert` end to end on tiny MoE model directories (issue 23):
the pruned model reloads with stock AutoModelForCausalLM (uniform expert counts without remote
code, uneven ones with it) and computes what prunekit's in-memory cut computes."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_moe_model

from prunekit import save_model
from prunekit.cli import main


@pytest.fixture
def moe_dir(tmp_path, tokenizer, request) -> Path:
    family = getattr(request, "param", "mixtral")
    save_model(tiny_moe_model(family), tokenizer, tmp_path / "model")
    words = random.Random(0).choices(["alpha", "beta", "gamma", "delta", "router", "expert", "token", "7", "?!"], k=3000)
    (tmp_path / "calib.txt").write_text(" ".join(words) + "\n")
    return tmp_path / "model"


def _args(moe_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(moe_dir), "--prune-structures", "expert", "--criterion", "reap", "--target", "0.25",
            "--out", str(out), "--calib", str(moe_dir.parent / "calib.txt"), "--calib-samples", "8",
            "--calib-seq-len", "32", *extra]


def _logits(path: Path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        return model(torch.arange(3, 19)[None]).logits


@pytest.mark.parametrize("moe_dir", ["mixtral", "qwen3_moe"], indirect=True)
def test_cli_prunes_experts_uniformly_to_a_stock_model(moe_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_args(moe_dir, tmp_path / "out", "--allocation", "uniform")) == 0
    assert "saved stock model" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # Qwen-MoE configs map num_experts to num_local_experts, which is the key they save
    assert config["num_local_experts"] < 6 and "layer_shapes" not in config and "auto_map" not in config
    assert not (tmp_path / "out" / "modeling_prunekit.py").exists()
    record = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert record["pruning"]["removed"]["non-embedding"] >= 0.25
    assert torch.isfinite(_logits(tmp_path / "out")).all()


def test_cli_prunes_experts_globally_and_reloads(moe_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_args(moe_dir, tmp_path / "out")) == 0
    record = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert record["pruning"]["removed"]["non-embedding"] >= 0.25
    remote = (tmp_path / "out" / "modeling_prunekit.py").exists()
    logits = _logits(tmp_path / "out", trust_remote_code=remote)
    import prunekit

    ours, _ = prunekit.load(str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(torch.arange(3, 19)[None]).logits, logits, rtol=1e-5, atol=1e-5)


def test_cli_refuses_expert_pruning_with_a_dense_criterion(moe_dir, tmp_path, capsys):
    args = _args(moe_dir, tmp_path / "out")
    args[args.index("reap")] = "magnitude"
    assert main(args) == 2
    assert "expert" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
