"""`prunekit prune --target` and `prunekit analyze` end to end on a tiny model directory, and
every bad setting refused before the model is loaded."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import prunekit
from prunekit.cli import main
from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_to_target

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 30


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=256), tokenizer,
                        tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    return tmp_path / "model"


def _settings(tmp_path, **overrides) -> PruneSettings:
    calibration = CalibrationSettings(source=str(tmp_path / "calib.txt"), n_samples=8, seq_len=32)
    return PruneSettings(**{"target": 0.3, "ffn_multiple": 16, "batch_size": 4, "calibration": calibration, **overrides})


@pytest.mark.parametrize("criterion", ["taylor", "activation", "sensitivity"])
def test_prune_to_target_end_to_end(model_dir, tmp_path, criterion):
    options = {"kinds": ("kv_group", "head", "channel"), "channel_group_size": 16} if criterion == "sensitivity" else {}
    settings = _settings(tmp_path, criterion=criterion, criterion_options=options, compensation="none")
    saved = prune_to_target(model_dir, tmp_path / "out", settings, progress=False)
    model, _ = prunekit.load(saved.path)
    removed = 1 - prunekit.model_structure(model).non_embedding_params / prunekit.model_structure(
        prunekit.load(model_dir)[0]).non_embedding_params
    assert 0.3 <= removed < 0.45
    provenance = json.loads((saved.path / "prunekit.json").read_text())
    assert provenance["pruning"]["settings"]["criterion"] == criterion
    assert provenance["plan"]["meta"]["criterion"] == criterion


def test_iterative_steps_reach_the_target(model_dir, tmp_path):
    settings = _settings(tmp_path, steps=2, compensation="none", allocation="global")
    saved = prune_to_target(model_dir, tmp_path / "out", settings, progress=False)
    provenance = json.loads((saved.path / "prunekit.json").read_text())["pruning"]
    assert len(provenance["steps"]) == 2
    assert 0.15 <= provenance["steps"][0]["removed"] < provenance["steps"][1]["removed"]
    assert provenance["removed"]["non-embedding"] >= 0.3


def test_cli_prune_target_uniform_gives_a_stock_model(model_dir, tmp_path, capsys):
    args = ["prune", str(model_dir), "--out", str(tmp_path / "out"), "--target", "0.25", "--allocation", "uniform",
            "--ffn-multiple", "16", "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "8",
            "--calib-seq-len", "32", "--no-compensate", "--criterion", "taylor", "--criterion-option", "variant=vector",
            "--prune-structures", "channel,head,kv_group"]
    import resource

    resident_before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "saved stock model" in printed
    assert re.search(r"memory: peak [0-9.]+ GiB on cpu \(admitted on an estimate of [0-9.]+ GiB\)", printed)
    memory = json.loads((tmp_path / "out" / "prunekit.json").read_text())["pruning"]["memory"]
    # the prune's own peak resident memory (Python and torch included): at least what the process
    # held as it started, at most the process's lifetime peak
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0.9 * resident_before <= memory["peak_bytes"] <= 1.05 * lifetime_peak  # (their page counts lag)
    assert memory["estimate_bytes"] > 0 and memory["device"] == "cpu"


def test_peak_memory_is_the_blocks_own_peak():
    from prunekit.models.memory import PeakMemory, _peak_resident_bytes

    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as large:
        block = torch.ones(64 * 2**20)  # 256 MiB, touched
        del block
    assert not large.since_start
    assert large.bytes - small.bytes > 200 * 2**20 and _peak_resident_bytes() >= small.bytes


@pytest.mark.parametrize("args, match", [
    (["--criterion", "wanda"], "invalid choice: 'wanda'"),
    (["--criterion", "taylor", "--criterion-option", "variant=second"], "option variant of taylor does not take"),
    (["--criterion", "block_influence"], "does not score \\['channel'\\]"),
    (["--calib", "wikipedia"], "unknown calibration source 'wikipedia'"),
    (["--calib", "missing.txt"], "does not exist"),
    (["--target", "1.5"], "must be a fraction in \\(0, 1\\)"),
    (["--prune-structures", "head", "--target", "0.8"], "at most 0\\.[0-9]+ can be removed"),
    (["--limit", "head"], "KEY=VALUE"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--criterion", "taylor", "--allocation", "slimllm"], "criterion 'taylor' does not record"),
])
def test_bad_settings_fail_before_loading(model_dir, tmp_path, monkeypatch, capsys, args, match):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("prunekit.pipeline.load", no_loading)
    base = ["prune", str(model_dir), "--out", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.txt")]
    if "--target" not in args:
        base += ["--target", "0.3"]
    try:
        code = main(base + args)
    except SystemExit as exit_:  # argparse rejects invalid choices itself
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_compensation_runs_in_the_pipeline_and_is_recorded(model_dir, tmp_path):
    settings = _settings(tmp_path, compensation="one-shot", criterion="activation")
    saved = prune_to_target(model_dir, tmp_path / "out", settings, progress=False)
    step = json.loads((saved.path / "prunekit.json").read_text())["pruning"]["steps"][0]
    fits = step["compensation"]["fits"]
    assert fits and all(f["error_after"] <= f["error_before"] for f in fits)


def test_sequential_compensation_in_the_pipeline(model_dir, tmp_path):
    settings = _settings(tmp_path, compensation="sequential", criterion="taylor", allocation="global")
    saved = prune_to_target(model_dir, tmp_path / "out", settings, progress=False)
    step = json.loads((saved.path / "prunekit.json").read_text())["pruning"]["steps"][0]
    fits = step["compensation"]["fits"]
    assert fits and all(f["error_after"] <= f["error_before"] + 1e-9 for f in fits)


def test_analyze_writes_scores_report_and_plots(model_dir, tmp_path, capsys):
    args = ["analyze", str(model_dir), "--out", str(tmp_path / "analysis"), "--calib", str(tmp_path / "calib.txt"),
            "--calib-samples", "4", "--calib-seq-len", "32", "--criterion-option", "kinds=layer,attention,mlp,head"]
    assert main(args) == 0
    out = tmp_path / "analysis"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["criterion"] == "sensitivity" and len(scores["values"]["layer"]) == 4
    report = (out / "analysis.md").read_text()
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images and all((out / image).is_file() for image in images)
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 2  # exists: refused without --force
    assert "already exists" in capsys.readouterr().err


def test_the_default_criterion_follows_the_compensation(model_dir, tmp_path, capsys):
    """OBS re-picks the units, so its scores only order them (magnitude, free); any other
    compensation keeps what the scores pick, so a prune that names only the compensation gets
    Taylor, from the API and the CLI alike; a named criterion is kept."""
    assert PruneSettings().criterion == "magnitude"
    assert PruneSettings(compensation="obs").criterion == "magnitude"
    for compensation in ("sequential", "one-shot", "none"):
        assert PruneSettings(compensation=compensation).criterion == "taylor"
        assert PruneSettings(compensation=compensation, criterion="activation").criterion == "activation"
    args = ["prune", str(model_dir), "--out", str(tmp_path / "out"), "--target", "0.25", "--ffn-multiple", "16",
            "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "8", "--calib-seq-len", "32",
            "--compensation", "sequential"]
    assert main(args) == 0
    settings = json.loads((tmp_path / "out" / "prunekit.json").read_text())["pruning"]["settings"]
    assert (settings["criterion"], settings["compensation"]) == ("taylor", "sequential")
