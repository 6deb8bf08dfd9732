"""benchmarks/recipes_grid.py (issue 27): each row prunes with the settings of the recipe it names,
the record survives a kill after any model and --resume completes it, the BENCHMARKS.md table it prints passes docs-check
against its record, and bad arguments are refused before any model loads."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_tokenizer, tiny_model

import prunekit
from prunekit.runner import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "recipes_grid.py"
# A tiny run: its own calibration rows and short windows; every recipe and the default at one target.
TINY = ["--device", "cpu", "--ratios", "0.3", "--calib-samples", "8", "--calib-seq-len", "64", "--eval-seq-len", "64",
        "--eval-every", "512", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grid():
    return _module("recipes_grid_benchmark", SCRIPT)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipes-grid") / "dense"
    prunekit.save_model(tiny_model("llama", intermediate_size=256, max_position_embeddings=256), byte_tokenizer(),
                        path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(shared_data_dir) -> str:
    if shared_data_dir is None:
        pytest.skip("needs the shared data sets (C4 and WikiText-2; PRUNEKIT_DATA_DIR)")
    return str(shared_data_dir)


@pytest.mark.parametrize("args, message", [
    (["--recipes", "slimllm,llm-prunr"], "--recipes takes shipped recipes"),
    (["--ratios", "0.2,1.5"], "--ratios are fractions in (0, 1)"),
    (["--ratios", "a"], "--ratios takes fractions such as 0.2,0.35,0.5"),
    (["--task-limit", "5"], "--task-limit limits --tasks"),
])
def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, args, message):
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "no-model"), *args,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_every_row_prunes_with_its_recipes_settings_and_the_table_checks(grid, dense, data_dir, tmp_path):
    out = tmp_path / "benchmarks" / "results" / "grid.json"
    grid.main(["--model", dense, "--data-dir", data_dir, *TINY, "--tasks", "piqa,arc_easy", "--task-limit", "4",
               "--out", str(out)])
    record = json.loads(out.read_text())
    assert [run["recipe"] for run in record["runs"]] == ["slimllm", "adapt-pruner", "llm-pruner", "default"]
    for run in record["runs"]:
        # the recipe's prune section, not a look-alike: only target, device, batch and (here) calibration size differ
        expected = (prunekit.PruneSettings() if run["recipe"] == "default" else load_recipe(run["recipe"]).prune)
        expected = json.loads(json.dumps(expected.to_dict()))  # as the record keeps it
        for key in ("criterion", "criterion_options", "allocation", "allocation_options", "prune", "compensation",
                    "ffn_multiple", "protect_layers", "steps", "reconstruct_steps"):
            assert run["settings"][key] == expected[key], (run["recipe"], key)
        assert run["settings"]["calibration"]["source"] == expected["calibration"]["source"]
        assert run["target"] == 0.3 and 0.25 < run["removed_non_embedding"] < 0.45
        assert math.isfinite(run["perplexity"]) and set(run["tasks"]) == {"piqa", "arc_easy"}
        assert all(run["tasks"][t]["n"] == 4 for t in run["tasks"])
    adapt = next(run for run in record["runs"] if run["recipe"] == "adapt-pruner")
    assert "recover" in adapt["not_run"] and any(item.startswith("schedule") for item in adapt["not_run"])
    assert next(r for r in record["runs"] if r["recipe"] == "default")["not_run"] == []

    # the printed table, checked by docs-check against the record (as BENCHMARKS.md will be)
    docs_check = _module("docs_check_for_grid", ROOT / "tools" / "docs_check.py")
    (tmp_path / "benchmarks" / "results" / "provenance.json").write_text(json.dumps({"grid.json": {"script": None}}))
    doc = tmp_path / "DOC.md"
    table = grid.markdown(record, "grid.json")
    doc.write_text(table + "\n")
    report = docs_check.check(tmp_path, [doc])
    assert report.failures == [] and report.checked >= 5 * 6
    assert "| prunekit's default | " in table and "| llm-pruner | " in table
    record["runs"][0]["perplexity"] *= 1.5  # a table that no longer matches its record fails
    out.write_text(json.dumps(record))
    assert docs_check.check(tmp_path, [doc]).failures


def test_a_killed_run_keeps_the_models_it_finished(grid, dense, data_dir, tmp_path, monkeypatch):
    import prunekit.pipeline as pipeline

    real, calls = pipeline.prune_loaded, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prune_loaded", dies_on_the_second)
    out = tmp_path / "grid.json"
    with pytest.raises(KeyboardInterrupt):
        grid.main(["--model", dense, "--data-dir", data_dir, *TINY, "--ratios", "0.2,0.4", "--recipes", "llm-pruner",
                   "--out", str(out)])
    record = json.loads(out.read_text())
    assert [(run["recipe"], run["target"]) for run in record["runs"]] == [("llm-pruner", 0.2)]
    assert "tasks" not in record["dense"] and math.isfinite(record["dense"]["perplexity"])

    # the same command with --resume runs only what is missing and keeps what was measured
    monkeypatch.setattr(pipeline, "prune_loaded", real)
    again = ["--model", dense, "--data-dir", data_dir, *TINY, "--ratios", "0.2,0.4", "--recipes", "llm-pruner",
             "--out", str(out), "--resume"]
    grid.main(again)
    resumed = json.loads(out.read_text())
    assert [(run["recipe"], run["target"]) for run in resumed["runs"]] == [("llm-pruner", 0.2), ("llm-pruner", 0.4)]
    assert resumed["runs"][0] == record["runs"][0] and resumed["dense"] == record["dense"]
    assert len(resumed["resumed"]) == 1
    with pytest.raises(SystemExit, match="another model or protocol"):  # another protocol is not mixed in
        grid.main([*again, "--eval-every", "256"])
