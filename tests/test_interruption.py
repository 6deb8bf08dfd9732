"""Interruption and determinism: `prunekit run` killed with SIGKILL inside each stage, as it starts
and while it writes its artifact, then run again, ends with the same artifacts (hashes) as a run
that was never interrupted; the input model's files are byte-identical after every command; Ctrl-C
says how to resume.

The kill while writing uses a test-only seam of the atomic writers (`KILL_WHILE_WRITING_ENV` in
prunekit/export/files.py): the process SIGKILLs itself with a file half written, or a folder
complete under its temporary name but not yet renamed into place."""
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
from prunekit.export.files import KILL_WHILE_WRITING_ENV

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The cat sat on the mat. The dog sat on the log. A bird sat on the wire and sang. " * 120)
STAGES = ["analyze", "plan", "prune", "recover", "evaluate", "bench", "export", "report"]
# What each stage writes as its artifact, in the run directory.
ARTIFACTS = {"analyze": "analysis", "plan": "plan.json", "prune": "model", "recover": "recovered",
             "evaluate": "eval.json", "bench": "bench.json", "export": "export", "report": "report.md"}
# Artifacts whose bytes must not depend on an interruption (records, provenance, timings and the
# report carry times; scores.json is compared below without the scoring's wall time).
COMPARED = ["plan.json", "model/model.safetensors", "recovered/model.safetensors",
            "export/model.safetensors"]


def test_the_recipe_here_runs_every_stage():
    from prunekit.runner.stages import STAGES as RUNNER_STAGES

    assert STAGES == list(RUNNER_STAGES) and set(ARTIFACTS) == set(STAGES)


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
    calibration = {"source": text, "n_samples": 8, "seq_len": 32}
    data = {
        "model": str(tmp_path / "dense"), "stages": STAGES,
        "analyze": {"criterion": "taylor", "calibration": calibration},
        "prune": {"target": 0.25, "ffn_multiple": 16, "calibration": calibration},
        "recover": {"method": "full", "tokens": 32 * 4 * 40, "lr": 0.003, "checkpoint_every": 5, "eval_every": 0,
                    "data": {"source": text, "seq_len": 32, "held_out": 2}},
        "evaluate": {"ppl": [text], "seq_len": 32, "window_every": 1, "dense": False},
        "bench": {"prefill_batch": 1, "prefill_len": 16, "decode_batches": [1], "decode_tokens": 4, "repeats": 1},
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


def _run(recipe: Path, out: Path, kill_while_writing: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop(KILL_WHILE_WRITING_ENV, None)
    if kill_while_writing is not None:
        env[KILL_WHILE_WRITING_ENV] = str(kill_while_writing)
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


def _kill_while_writing(recipe: Path, out: Path, stage: str) -> None:
    """Run until `stage` writes its artifact, which kills the run mid-write; check it died there."""
    process = _run(recipe, out, kill_while_writing=out / ARTIFACTS[stage])
    output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL, (stage, output[-2000:])
    assert f"[{stage}] running" in output and f"[{stage}] done" not in output, (stage, output[-2000:])
    assert not (out / ARTIFACTS[stage]).exists(), f"{stage}: a half-written {ARTIFACTS[stage]} under its final name"
    assert list(out.glob(f".{ARTIFACTS[stage]}*tmp*")), f"{stage}: the kill came before the write began"


def _scores_without_time(path: Path) -> dict:
    scores = json.loads(path.read_text())
    seconds = scores["meta"]["cost"].pop("seconds_total")
    assert seconds >= 0
    return scores


def _assert_ends_like(killed: Path, straight: Path, stage: str) -> None:
    """The rerun of a killed run finished with the artifacts of the uninterrupted one."""
    again_hashes, straight_hashes = _hashes(killed), _hashes(straight)
    for artifact in COMPARED:
        assert again_hashes[artifact] == straight_hashes[artifact], (stage, artifact)
    ours, theirs = (_scores_without_time(d / "analysis" / "scores.json") for d in (killed, straight))
    assert ours == theirs, (stage, "analysis/scores.json")
    ours, theirs = (json.loads((d / "eval.json").read_text())["perplexity"] for d in (killed, straight))
    assert {k: v["perplexity"] for k, v in ours.items()} == {k: v["perplexity"] for k, v in theirs.items()}
    ours, theirs = (json.loads((d / "bench.json").read_text())["speed"] for d in (killed, straight))
    assert ours["model"]["timings"].keys() == theirs["model"]["timings"].keys()
    assert ours["ideal_speedup"] == theirs["ideal_speedup"]
    assert (killed / "report.md").read_text().count("\n#") == (straight / "report.md").read_text().count("\n#")
    assert sorted(p.name for p in (killed / "records").iterdir()) == [f"{s}.json" for s in sorted(STAGES)]
    leftovers = [p for p in killed.rglob("*") if ".tmp" in p.name and "checkpoints" not in str(p)]
    assert not leftovers, (stage, leftovers)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["start", "writing"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_inside_any_stage_ends_like_an_uninterrupted_one(recipe, straight, tmp_path, stage, moment):
    model_before = _hashes(recipe.parent / "dense")
    killed = tmp_path / "killed"
    if moment == "start":
        _kill_inside(_run(recipe, killed), killed, stage)
    else:
        _kill_while_writing(recipe, killed, stage)
    assert not (killed / "records" / f"{stage}.json").exists(), f"the run finished {stage} before the kill"
    again = _run(recipe, killed)
    output = again.communicate()[0]
    assert again.returncode == 0, output[-2000:]
    _assert_ends_like(killed, straight, stage)
    assert _hashes(recipe.parent / "dense") == model_before  # the input model is untouched


def test_a_run_killed_while_writing_each_artifact_in_turn_ends_like_an_uninterrupted_one(recipe, straight, tmp_path):
    """The default suite's version of the slow test above, one process per kill: each run resumes
    the last one's kill and is killed while the next stage writes its artifact."""
    model_before = _hashes(recipe.parent / "dense")
    killed = tmp_path / "killed"
    for number, stage in enumerate(STAGES):
        _kill_while_writing(recipe, killed, stage)
        records = sorted(p.stem for p in (killed / "records").glob("*.json"))
        assert records == sorted(STAGES[:number]), (stage, records)
    again = _run(recipe, killed)
    output = again.communicate()[0]
    assert again.returncode == 0, output[-2000:]
    _assert_ends_like(killed, straight, "every stage")
    assert _hashes(recipe.parent / "dense") == model_before


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


def test_a_rerun_removes_only_what_killed_writers_left(tmp_path):
    from prunekit.export.files import remove_stale_temporaries

    left = [tmp_path / ".plan.json.k2j4_x.tmp", tmp_path / ".model.tmp-ab12_c", tmp_path / ".export.old-9z"]
    kept = [tmp_path / "plan.json", tmp_path / ".gitignore", tmp_path / "notes.tmp", tmp_path / "model"]
    for path in left[:1] + kept[:3]:
        path.write_text("x")
    for path in left[1:] + kept[3:]:
        path.mkdir()
        (path / "model.safetensors").write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(left)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)
