"""A recipe's schedule (Adapt-Pruner): prune and recover in rounds, each round pruning the model the
round before recovered, to cumulative targets counted against the original model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

import prunekit
from prunekit.models.loading import load_skeleton, resolve_model_source
from prunekit.models.structure import model_structure
from prunekit.pipeline import PruneSettings
from prunekit.plan.plan import predicted_structure
from prunekit.plan.planner import basis_value, removed_fraction
from prunekit.recover import RecoveryError
from prunekit.recover.train import RecoverySettings
from prunekit.runner import RecipeError, load_recipe
from prunekit.runner import schedule as schedule_module
from prunekit.runner.recipe import ScheduleSettings
from prunekit.runner.stages import recipe_stages
from tests.conftest import saved_tiny_llama, tiny_model



@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture
def recipe(tmp_path) -> dict:
    model, text = saved_tiny_llama(tmp_path)
    return {
        "model": model,
        "stages": ["prune", "recover", "evaluate"],
        "prune": {"target": 0.3, "ffn_multiple": 16, "compensation": "none",
                  "calibration": {"source": text, "n_samples": 8, "seq_len": 32}},
        "recover": {"method": "full", "tokens": 2 * 32 * 4 * 3, "lr": 0.003, "eval_every": 0, "checkpoint_every": 1,
                    "data": {"source": text, "seq_len": 32, "held_out": 2}},
        "schedule": {"rounds": 2},
        "evaluate": {"ppl": [text], "seq_len": 32, "window_every": 1, "dense": False},
    }


def _structure(path) -> prunekit.ModelStructure:
    return model_structure(load_skeleton(resolve_model_source(path)))


def _weights(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the arithmetic


def test_a_rounds_target_counts_against_the_original_model():
    # the input already lost 10% of the original's 100; to end at 30% of the original it loses 70 -> ... of its 90
    target = schedule_module.round_target(0.3, original_basis=100.0, input_basis=90.0)
    assert 90.0 * (1 - target) == pytest.approx(70.0)
    assert schedule_module.round_target(0.2, 100.0, 100.0) == pytest.approx(0.2)  # round 1: the input is the original
    assert schedule_module.round_target(0.1, 100.0, 85.0) < 0  # already past it: the round would add nothing


def _narrowed(structure, channels: int):
    """The structure with every FFN `channels` wide, as a plan would leave it."""
    plan = prunekit.Plan(layers={i: prunekit.LayerPlan(keep_channels=tuple(range(channels)))
                                 for i in range(structure.num_layers)})
    return predicted_structure(plan, structure)


def test_limits_and_protected_layers_count_against_the_original():
    original = model_structure(tiny_model("llama", intermediate_size=128))
    halved = _narrowed(original, 64)  # half the channels gone: 75% of the original is 50% of what is left
    assert schedule_module.round_limits({"channel": 0.75}, original, halved)["channel"] == pytest.approx(0.5)
    assert schedule_module.round_limits({"channel": 0.25}, original, halved)["channel"] == 0.0  # spent already
    assert schedule_module.round_limits({"head": 0.5}, original, original) == {"head": 0.5}
    assert schedule_module.round_protected_layers((0, 3), [0, 2, 3]) == (0, 2)  # layer 1 was dropped before
    assert schedule_module.round_protected_layers((1,), None) == (1,)


def test_even_steps_split_the_target_and_the_tokens():
    schedule = ScheduleSettings(rounds=4)
    assert schedule.cumulative_targets(0.2) == pytest.approx((0.05, 0.1, 0.15, 0.2))
    recover = RecoverySettings(tokens=64_000)  # the budget of all the rounds together, as in a one-shot recipe
    third = schedule_module.round_recover_settings(recover, schedule, 3)
    assert third.tokens == 16_000 and third.data.seed == recover.data.seed + 2  # other rows each round
    given = ScheduleSettings(rounds=2, targets=(0.05, 0.2))
    assert given.cumulative_targets(0.2) == (0.05, 0.2)


def test_round_settings_reach_the_cumulative_target_of_the_original():
    original = model_structure(tiny_model("llama", intermediate_size=128))
    settings, schedule = PruneSettings(target=0.3, ffn_multiple=16), ScheduleSettings(rounds=3)
    first = schedule_module.round_prune_settings(settings, schedule, 1, original, original)
    assert first.target == pytest.approx(0.1)
    smaller = _narrowed(original, 112)
    second = schedule_module.round_prune_settings(settings, schedule, 2, original, smaller)
    left = basis_value(smaller, "non-embedding") * (1 - second.target)
    assert 1 - left / basis_value(original, "non-embedding") == pytest.approx(0.2)
    with pytest.raises(RecipeError, match="round 2 would remove nothing: the rounds before it already removed"):
        schedule_module.round_prune_settings(settings, schedule, 2, original, _narrowed(original, 64))


# ----------------------------------------------------------------------------- the recipe


def test_the_schedule_expands_into_rounds_of_prune_and_recover(recipe):
    recipe["stages"] = ["analyze", "prune", "recover", "evaluate", "report"]
    recipe["schedule"]["rounds"] = 3
    names = [stage.name for stage in recipe_stages(load_recipe(recipe))]
    assert names == ["analyze", "prune@1", "recover@1", "prune@2", "recover@2", "prune@3", "recover@3", "evaluate",
                     "report"]
    del recipe["schedule"]
    assert [s.name for s in recipe_stages(load_recipe(recipe))] == recipe["stages"]


@pytest.mark.parametrize("change, match", [
    (lambda r: r["schedule"].update(steps=3), "unknown key recipe.schedule.steps; valid keys of recipe.schedule: "
                                              "rounds, targets"),
    (lambda r: r["schedule"].update(rounds=0), "schedule.rounds must be at least 1"),
    (lambda r: r["schedule"].update(targets=[0.1]), "names 1 cumulative targets for 2 rounds"),
    (lambda r: r["schedule"].update(targets=[0.2, 0.1]), "must rise from round to round"),
    (lambda r: r["schedule"].update(targets=[0.1, 0.25]), "end at 0.25, but prune.target is 0.3"),
    (lambda r: r.update(stages=["prune", "evaluate"]), "interleaves the prune and recover stages"),
    (lambda r: r.update(stages=["plan", "prune", "recover"]), "drop the plan stage or the schedule"),
])
def test_bad_schedules_name_the_key_and_the_fix(recipe, tmp_path, change, match):
    change(recipe)
    with pytest.raises(RecipeError, match=match):
        prunekit.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_preflight_names_the_round_that_cannot_run(recipe, tmp_path, monkeypatch):
    """Round 2's target lies below what round 1 leaves (its cut rounds to whole groups of 16
    channels): refused before round 1 runs, naming round 2."""
    recipe["schedule"]["targets"] = [0.29, 0.3]
    recipe["schedule"]["rounds"] = 2
    monkeypatch.setattr(schedule_module, "_run_prune_round", lambda *a: pytest.fail("a round ran"))
    first = schedule_module.round_prune_settings(
        load_recipe(recipe).prune, load_recipe(recipe).schedule, 1, _structure(recipe["model"]),
        _structure(recipe["model"]))
    assert first.target == pytest.approx(0.29)
    with pytest.raises(RecipeError, match=r"the prune@2 stage \(round 2 of 2\): round 2 would remove nothing"):
        prunekit.run(recipe, tmp_path / "run", dry_run=True)
    recipe["recover"]["tokens"] = 2 * 32 * 2  # half a step a round: each round's recovery is checked
    del recipe["schedule"]["targets"]
    with pytest.raises(RecoveryError, match="recover@1 stage \\(round 1 of 2\\).*smaller than one optimizer"):
        prunekit.run(recipe, tmp_path / "run", dry_run=True)


# ----------------------------------------------------------------------------- running it


def test_a_two_round_schedule_prunes_the_recovered_model_to_the_original_target(recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    records = prunekit.run(recipe, run_dir)
    assert list(records) == ["prune@1", "recover@1", "prune@2", "recover@2", "evaluate"]
    out = capsys.readouterr().out
    assert "[prune@2] running (round 2 of 2)" in out and "[recover@1] done in" in out

    original = _structure(recipe["model"])
    first, final = _structure(run_dir / "rounds/1/recovered"), _structure(run_dir / "recovered")
    assert removed_fraction(original, first, "non-embedding") == pytest.approx(0.15, abs=0.06)
    assert removed_fraction(original, final, "non-embedding") == pytest.approx(0.3, abs=0.06)
    assert _structure(run_dir / "rounds/2/model").total_params == final.total_params
    assert _weights(run_dir / "recovered") == _weights(run_dir / "rounds/2/recovered")  # linked, not copied
    assert (run_dir / "recovered/model.safetensors").stat().st_ino == \
        (run_dir / "rounds/2/recovered/model.safetensors").stat().st_ino

    provenance = json.loads((run_dir / "recovered/prunekit.json").read_text())
    pruning = provenance["pruning"]
    assert provenance["source_model"] == recipe["model"]
    assert [r["round"] for r in pruning["rounds"]] == [1, 2]
    assert [r["cumulative_target"] for r in pruning["rounds"]] == pytest.approx([0.15, 0.3])
    assert pruning["rounds"][1]["input"] == str(run_dir / "rounds/1/recovered")
    assert [r["recovery"]["data_seed"] for r in pruning["rounds"]] == [0, 1]
    assert all(r["recovery"]["tokens"] == 32 * 4 * 3 for r in pruning["rounds"])
    assert [s["round"] for s in pruning["steps"]] == [1, 2]
    assert pruning["params"]["before"] == original.total_params and pruning["params"]["after"] == final.total_params
    assert pruning["removed"]["non-embedding"] == pytest.approx(removed_fraction(original, final, "non-embedding"),
                                                                abs=1e-6)
    # round 2's plan is relative to round 1's recovered model: its widths are those of that model
    second_plan = prunekit.Plan.from_dict(pruning["steps"][1]["plan"])
    assert predicted_structure(second_plan, first).total_params == final.total_params
    # the recovery of round 2 trained from the pruned model of round 2 (teacher: the original)
    assert provenance["recovery"]["teacher"] == recipe["model"]
    records_2 = json.loads((run_dir / "records/prune@2.json").read_text())
    assert records_2["figures"]["cumulative_target"] == pytest.approx(0.3)
    assert records_2["figures"]["params"]["non_embedding_before"] == original.non_embedding_params


def test_one_round_is_the_plain_prune_then_recover(recipe, tmp_path):
    """Invariance: a schedule of one round trains the same weights as the prune and recover stages
    with the same budget (same rows, same seed)."""
    recipe["schedule"] = {"rounds": 1}
    prunekit.run(recipe, tmp_path / "scheduled")
    plain = {k: v for k, v in recipe.items() if k != "schedule"}
    prunekit.run(plain, tmp_path / "plain")
    assert _weights(tmp_path / "scheduled/recovered") == _weights(tmp_path / "plain/recovered")


def test_a_schedule_killed_mid_round_resumes_there_and_ends_as_an_uninterrupted_one(recipe, tmp_path, monkeypatch):
    prunekit.run(recipe, tmp_path / "straight")
    run_dir = tmp_path / "killed"
    recover_round = schedule_module._run_recover_round

    def killed(k, *args):
        if k == 2:
            raise KeyboardInterrupt
        return recover_round(k, *args)

    monkeypatch.setattr(schedule_module, "_run_recover_round", killed)
    with pytest.raises(KeyboardInterrupt):
        prunekit.run(recipe, run_dir)
    assert sorted(p.stem for p in (run_dir / "records").glob("*.json")) == ["prune@1", "prune@2", "recover@1"]
    monkeypatch.setattr(schedule_module, "_run_recover_round", recover_round)
    for name in ("_run_prune_round",):
        monkeypatch.setattr(schedule_module, name, lambda *a: pytest.fail("a finished round ran again"))
    records = prunekit.run(recipe, run_dir)
    assert "final" in records["evaluate"]["figures"]
    for folder in ("rounds/1/model", "rounds/1/recovered", "rounds/2/model", "recovered"):
        assert _weights(run_dir / folder) == _weights(tmp_path / "straight" / folder), folder

    recipe["schedule"]["rounds"] = 3  # a finished round is never mixed with other settings
    with pytest.raises(RecipeError, match=r"stage prune@1 finished in .* with other settings \(schedule\)"):
        prunekit.run(recipe, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prune@2", "recover@2"])
def test_a_schedule_killed_with_sigkill_inside_a_round_ends_as_an_uninterrupted_one(recipe, tmp_path, stage):
    """`prunekit run` killed (SIGKILL) inside round 2's prune, or inside its recovery once a
    checkpoint exists, then run again: the same weights as a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    recipe["recover"]["tokens"] = 2 * 32 * 4 * 12  # 12 steps a round, a checkpoint after each
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "prunekit.cli", "run", str(path), "--out", str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    assert start(tmp_path / "straight").wait() == 0
    killed = tmp_path / "killed"
    process = start(killed)
    for line in process.stdout:
        if f"[{stage}] running" in line:
            break
    if stage.startswith("recover"):
        deadline = time.time() + 240
        while not (killed / "rounds/2/recovered.checkpoints/last").exists() and time.time() < deadline:
            time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "records" / f"{stage}.json").exists(), f"the run finished {stage} before the kill"
    again = start(killed)
    output = again.communicate()[0]
    assert again.returncode == 0, output[-2000:]
    assert "[recover@1] done before" in output
    for folder in ("rounds/2/model", "rounds/2/recovered", "recovered"):
        assert _weights(killed / folder) == _weights(tmp_path / "straight" / folder), folder
