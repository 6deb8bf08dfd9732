"""The core commands end to end on a tiny model directory: inspect, prune; loading errors."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

import prunekit
from prunekit import LayerPlan, Plan, save_model
from prunekit.cli import main
from prunekit.models.loading import ModelLoadError, resolve_model_source


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    save_model(tiny_model("qwen3"), tokenizer, tmp_path / "model")
    return tmp_path / "model"


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_inspect_table_and_json(model_dir, capsys):
    assert main(["inspect", str(model_dir)]) == 0
    table = capsys.readouterr().out
    assert "qwen3, 4 layers, hidden 48, head_dim 12" in table
    assert "2 x 4 q/group" in table
    assert main(["inspect", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_layers"] == 4 and data["layers"][0]["num_key_value_heads"] == 2
    assert data["layers"][0]["attention_params"] + data["layers"][0]["mlp_params"] == data["layers"][0]["params"]
    assert data["params"]["total"] == sum(p.numel() for p in prunekit.load(model_dir)[0].parameters())


def test_prune_command_writes_a_loadable_model_and_leaves_the_input_alone(model_dir, tmp_path, capsys):
    before = _hashes(model_dir)
    plan = Plan(layers={0: LayerPlan(keep_kv_groups=(1,)), 2: LayerPlan(drop_mlp=True)}, drop_layers=(3,))
    plan.save(tmp_path / "plan.json")
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 0
    assert "saved prunekit model" in capsys.readouterr().out
    model, _ = prunekit.load(tmp_path / "out")
    assert prunekit.model_structure(model).num_layers == 3
    assert _hashes(model_dir) == before
    # Again without --force: refused, output untouched; with --force: replaced.
    out_before = _hashes(tmp_path / "out")
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists; choose another path or pass --force" in capsys.readouterr().err
    assert _hashes(tmp_path / "out") == out_before
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--force"]) == 0


def test_prune_refuses_to_write_into_the_input(model_dir, tmp_path, capsys):
    Plan(drop_layers=(1,)).save(tmp_path / "plan.json")
    before = _hashes(model_dir)
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(model_dir), "--force"]) == 2
    assert "overlaps the input model" in capsys.readouterr().err
    assert _hashes(model_dir) == before


def test_bad_plan_is_reported_in_one_line(model_dir, tmp_path, capsys):
    Plan(layers={0: LayerPlan(keep_query_heads=())}).save(tmp_path / "plan.json")
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop_attention" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_spec_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        resolve_model_source(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="no model at"):
        resolve_model_source(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model_source(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model_source(tmp_path / "weights.bin")
    assert resolve_model_source("meta-llama/Llama-3.2-1B").kind == "hub"


def test_unsupported_family_lists_the_supported_ones(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["inspect", str(tmp_path / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert "does not support model type 'gpt2'" in err and "gemma2, gemma3_text, llama, mistral, mixtral, olmoe, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe" in err
    assert "src/prunekit/models/<family>.py" in err


def test_corrupt_weights_are_reported(model_dir, tmp_path, capsys):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage")
    Plan(drop_layers=(1,)).save(tmp_path / "plan.json")
    assert main(["prune", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load the weights" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "prunekit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout and "prune" in result.stdout
