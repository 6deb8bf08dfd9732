"""Recipe key `bench.decode`: a recipe and its bench stage choose the decode timing as `prunekit bench
--decode` does (graph or eager), and a value the bench cannot run is refused when the recipe loads."""
from __future__ import annotations

import json

import pytest

import prunekit
from prunekit.runner import RecipeError, load_recipe
from prunekit.runner import stages as run_module
from tests.conftest import saved_tiny_llama



@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture
def prune_and_bench(tmp_path) -> dict:
    model, text = saved_tiny_llama(tmp_path)
    return {
        "model": model,
        "stages": ["prune", "bench"],
        "prune": {"target": 0.25, "ffn_multiple": 16,
                  "calibration": {"source": text, "n_samples": 8, "seq_len": 32}},
        "bench": {"prefill_batch": 1, "prefill_len": 16, "decode_batches": [1], "decode_tokens": 4, "repeats": 1},
    }


def test_the_recipe_decode_key_reaches_the_bench_call_and_its_record(prune_and_bench, tmp_path, monkeypatch):
    from prunekit.evaluate import run as evaluate_run

    seen = {}
    for name in ("preflight_bench", "bench_models"):
        real = getattr(evaluate_run, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = kwargs.get("decode")
            return _real(*args, **kwargs)

        monkeypatch.setattr(evaluate_run, name, spy)
    prune_and_bench["bench"]["decode"] = "eager"
    records = prunekit.run(prune_and_bench, tmp_path / "run")
    assert seen == {"preflight_bench": "eager", "bench_models": "eager"}
    assert json.loads((tmp_path / "run" / "bench.json").read_text())["speed"]["settings"]["decode"] == "eager"
    assert records["bench"]["figures"]["decode"] == "eager"


def test_without_the_key_the_bench_stage_times_decode_as_prunekit_bench_does():
    cpu = load_recipe({"model": "m", "stages": ["bench"]})
    assert cpu.bench.decode is None and run_module._bench_options(cpu)["decode"] is None  # eager on cpu, graph on cuda
    gpu = load_recipe({"model": "m", "stages": ["bench"]}, ["bench.device=cuda", "bench.decode=graph"])
    assert run_module._bench_options(gpu)["decode"] == "graph"


@pytest.mark.parametrize("override, message", [
    ("bench.decode=fast", r"bench\.decode 'fast' is not a decode timing; choose one of graph, eager"),
    ("bench.decode=graph", r"bench\.decode graph replays CUDA graphs, which need bench\.device=cuda; "
                           r"set bench\.decode=eager"),
])
def test_a_decode_the_bench_cannot_run_is_refused_before_any_stage_runs(prune_and_bench, tmp_path, monkeypatch,
                                                                        override, message):
    monkeypatch.setattr(run_module, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr("prunekit.pipeline.load", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(prune_and_bench, [override])
    key, value = override.split("=")
    prune_and_bench["bench"]["decode"] = value
    with pytest.raises(RecipeError, match=message):
        prunekit.run(prune_and_bench, tmp_path / "run")
    assert not (tmp_path / "run").exists()
