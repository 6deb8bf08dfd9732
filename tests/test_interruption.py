"""Interruption and determinism: `prunekit run` killed with SIGKILL inside each stage, then run
again, ends with the same artifacts (hashes) as a run that was never interrupted; the input
model's files are byte-identical after every command; Ctrl-C says how to resume."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import byte_tokenizer, tiny_model

import prunekit

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The cat sat on the mat. The dog sat on the log. A bird sat on the wire and sang. " * 120)
STAGES = ["plan", "prune", "recover", "evaluate", "export", "report"]
# Artifacts whose bytes must not depend on an interruption (records and provenance carry times).
COMPARED = ["plan.json", "model/model.safetensors", "recovered/model.safetensors", "export/model.safetensors"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("interruption")
    prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=256), byte_tokenizer(),
                        tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    text = str(tmp_path / "text.txt")
    data = {
        "model": str(tmp_path / "dense"), "stages": STAGES,
        "prune": {"target": 0.25, "ffn_multiple": 16, "calibration": {"source": text, "n_samples": 8, "seq_len": 32}},
        "recover": {"method": "full", "tokens": 32 * 4 * 40, "lr": 0.003, "checkpoint_every": 5, "eval_every": 0,
                    "data": {"source": text, "seq_len": 32, "held_out": 2}},
        "evaluate": {"ppl": [text], "seq_len": 32, "window_every": 1, "dense": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def straight(recipe) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = recipe.parent / "straight"
    assert _run(recipe, out).wait() == 0
    return out


def _run(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "prunekit.cli", "run", str(recipe), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_inside(process: subprocess.Popen, out: Path, stage: str) -> None:
    """SIGKILL the run as soon as it says it is running `stage` (for recovery: once a checkpoint
    exists, so that the rerun resumes from it)."""
    for line in process.stdout:
        if f"[{stage}] running" in line:
            break
    if stage == "recover":
        deadline = time.time() + 240
        while not (out / "recovered.checkpoints" / "last").exists() and time.time() < deadline:
            time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_inside_any_stage_ends_like_an_uninterrupted_one(recipe, straight, tmp_path, stage):
    model_before = _hashes(recipe.parent / "dense")
    killed = tmp_path / "killed"
    _kill_inside(_run(recipe, killed), killed, stage)
    assert not (killed / "records" / f"{stage}.json").exists(), f"the run finished {stage} before the kill"
    again = _run(recipe, killed)
    output = again.communicate()[0]
    assert again.returncode == 0, output[-2000:]
    for artifact in COMPARED:
        assert _hashes(killed)[artifact] == _hashes(straight)[artifact], (stage, artifact)
    for name in ("eval.json",):
        ours, theirs = (json.loads((d / name).read_text())["perplexity"] for d in (killed, straight))
        assert {k: v["perplexity"] for k, v in ours.items()} == {k: v["perplexity"] for k, v in theirs.items()}
    assert not list(killed.rglob("*.tmp*")) or all("checkpoints" in str(p) for p in killed.rglob("*.tmp*"))
    assert _hashes(recipe.parent / "dense") == model_before  # the input model is untouched


def test_the_same_seed_gives_the_same_scores_plan_and_weights(tmp_path):
    prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=256), byte_tokenizer(),
                        tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    before = _hashes(tmp_path / "dense")
    calibration = prunekit.CalibrationSettings(source=str(tmp_path / "text.txt"), n_samples=8, seq_len=32)
    settings = prunekit.PruneSettings(target=0.3, ffn_multiple=16, calibration=calibration)
    for out in ("a", "b"):
        prunekit.prune_to_target(tmp_path / "dense", tmp_path / out, settings, progress=False)
    a, b = (json.loads((tmp_path / d / "prunekit.json").read_text())["pruning"]["steps"][0]["plan"] for d in "ab")
    assert a == b
    assert _hashes(tmp_path / "a")["model.safetensors"] == _hashes(tmp_path / "b")["model.safetensors"]
    assert _hashes(tmp_path / "dense") == before


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path):
    from prunekit import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.runner.run", interrupted)
    assert cli.main(["run", "recipe.yaml", "--out", str(tmp_path / "run")]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    monkeypatch.setattr(importlib.import_module("prunekit.recover"), "recover", interrupted)
    assert cli.main(["recover", "pruned", "--out", str(tmp_path / "r"), "--teacher", "t"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_a_full_disk_during_save_leaves_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    from prunekit.cli import main as cli_main

    prunekit.save_model(tiny_model("llama"), byte_tokenizer(), tmp_path / "dense")

    def no_space(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", no_space)
    plan = tmp_path / "plan.json"
    prunekit.Plan(drop_layers=(1,)).save(plan)
    assert cli_main(["prune", str(tmp_path / "dense"), "--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "the disk filled up while writing" in message and "free some space" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
