"""`prunekit report`: a run folder (pruned model, scores, eval and bench JSON) as one Markdown report."""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from prunekit import LayerPlan, Plan, apply_plan, model_structure, save_model
from prunekit.evaluate.speed import ModelSpeed, SpeedResult, SpeedSettings, Spread, metric_names
from prunekit.export.files import OutputExistsError
from prunekit.plan import structure_signature
from prunekit.export.model_card import before_structure
from prunekit.report.run_report import MARKER, REPORT_COMMAND, RunReportError, write_run_report
from prunekit.score.scores import Scores

# Layer 0 loses a KV group, layer 1 its attention, layer 2 goes, layer 3 keeps half its channels.
LAYERS = {0: LayerPlan(keep_kv_groups=(1,)), 1: LayerPlan(drop_attention=True), 3: LayerPlan(keep_channels=tuple(range(40)))}


def _eval_json(spec: str, location: Path, parameters: int, perplexity: float) -> dict:
    """An evaluate_model report, as `prunekit eval --json` writes it."""
    protocol = {"seq_len": 64, "stride": None, "window_every": 1, "dataset": "wikitext2", "split": "test"}
    return {
        "format": "prunekit.eval/1",
        "model": {"spec": spec, "source": "directory", "location": str(location), "parameters": parameters,
                  "dtype": "float32", "load_seconds": 0.1},
        "perplexity": {"wikitext2": {"perplexity": perplexity, "mean_nll": 3.0, "n_tokens": 6300, "n_windows": 100,
                                     "seconds": 1.0, "protocol": protocol}},
        "tasks": {"piqa": {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.62, "acc_norm_stderr": 0.01, "n": 1838,
                           "seconds": 5.0, "protocol": {"limit": None}}},
        "environment": {},
    }


def _bench_json(model_params: int, baseline_params: int) -> dict:
    """A bench_models report, as `prunekit bench --json` writes it."""
    settings = SpeedSettings(device="cpu", dtype="float32", prefill_batch=2, prefill_len=32, decode_batches=(1,),
                             decode_context=16, decode_tokens=8, warmup=1, repeats=3, use_compile=False, seed=0,
                             memory_method="weights")
    # the pruned model 1.2x faster on every metric: more tokens/s, fewer ms
    faster, slower = Spread(12.0, 11.5, 12.5), Spread(10.0, 9.5, 10.5)
    names = metric_names(settings)
    model = {name: slower if name.startswith("time_") else faster for name in names}
    baseline = {name: faster if name.startswith("time_") else slower for name in names}
    result = SpeedResult(settings, ModelSpeed(model, 50.0, model_params), ModelSpeed(baseline, 60.0, baseline_params),
                         speedup={name: Spread(1.2, 1.1, 1.3) for name in names}, ideal_speedup=1.3, ideal_basis="FLOPs")
    return {"format": "prunekit.bench/1", "model": {"spec": "pruned"}, "baseline": {"spec": "dense"},
            "speed": result.to_dict(), "environment": {}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    tokenizer = byte_tokenizer()
    dense = tiny_model("llama")  # 4 layers, 8 heads in 2 KV groups, 80 channels
    structure = model_structure(dense)
    save_model(dense, tokenizer, root / "dense")
    plan = Plan(LAYERS, drop_layers=(2,), model=structure_signature(structure), meta={"made_by": "hand"})
    pruned = copy.deepcopy(dense)
    after = apply_plan(pruned, plan)
    save_model(pruned, tokenizer, root / "run" / "model", plan=plan, source="tiny-llama")
    run = root / "run"
    values = {"layer": [torch.tensor(float(i + 1)) for i in range(4)],
              "head": [torch.rand(8, dtype=torch.float64) for _ in range(4)],
              "channel": [torch.rand(80, dtype=torch.float64) for _ in range(4)]}
    Scores("sensitivity", values, {"unit": "loss increase"}).save(run / "scores.json")
    for name, spec, location, params, ppl in (("eval_dense.json", "dense", root / "dense", structure.total_params, 20.0),
                                              ("eval_pruned.json", "pruned", run / "model", after.total_params, 30.0)):
        (run / name).write_text(json.dumps(_eval_json(spec, location, params, ppl)))
    (run / "bench.json").write_text(json.dumps(_bench_json(after.total_params, structure.total_params)))
    return run


def _linked_images(report: Path) -> list[Path]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text(encoding="utf-8"))
    return [report.parent / link for link in links]


def test_report_has_every_section_and_its_figures(run_dir):
    report = write_run_report(run_dir)
    assert report == run_dir / "report.md"
    text = report.read_text(encoding="utf-8")
    assert text.startswith(MARKER)
    for heading in ("## Pruned model", "### What was removed", "### Widths per layer", "## Quality", "### Perplexity",
                    "### Zero-shot tasks", "## Speed", "## Importance scores", "## Not found"):
        assert heading in text, heading
    assert "| 1 | 8 → 0 (removed) | 2 → 0 (removed) | 80 |" in text
    assert "| 2 | dropped | dropped | dropped |" in text
    assert "| 3 | 8 | 2 | 80 → 40 |" in text
    assert "1.20× (1.10–1.32)" in text and "1.30×" in text  # measured (12 / 10, 11.5 / 10.5, 12.5 / 9.5) and ideal
    assert "0.6000 ± 0.0100" in text
    assert "No compensation fits" in text and "No `summary.json`" in text
    images = _linked_images(report)
    names = {image.name for image in images}
    assert names == {"kept_widths.png", "layer_scores.png", "head_scores.png", "channel_scores.png", "quality_vs_size.png"}
    assert all(image.is_file() and image.stat().st_size for image in images)
    assert write_run_report(run_dir) == report  # its own report is replaced on a second run


def test_before_structure_is_costed_exactly_without_the_source_model():
    model = tiny_model("llama")
    dense = model_structure(model)
    plan = Plan(LAYERS, drop_layers=(2,), model=structure_signature(dense))
    after = apply_plan(model, plan)
    before = before_structure(plan.model, after, [2], source="tiny-llama")  # not resolvable: rebuilt from the plan
    assert before.layers == dense.layers
    assert before.non_embedding_params == dense.non_embedding_params
    assert before.total_params == dense.total_params


def test_report_beside_another_tools_report_never_overwrites_it(run_dir, tmp_path):
    demo_report = tmp_path / "report.md"
    demo_report.write_text("# prunekit demo\n")
    (tmp_path / "scores.json").write_text((run_dir / "scores.json").read_text())
    path = write_run_report(tmp_path)
    assert path == tmp_path / "run_report.md"
    assert demo_report.read_text() == "# prunekit demo\n"
    assert "No pruned model" in path.read_text()
    with pytest.raises(OutputExistsError, match="not written by `prunekit report`"):
        write_run_report(tmp_path, out=demo_report)
    assert demo_report.read_text() == "# prunekit demo\n"


def test_out_elsewhere_links_figures_relative_to_the_report(run_dir, tmp_path):
    report = write_run_report(run_dir, out=tmp_path / "nested" / "report.md")
    images = _linked_images(report)
    assert images and all(image.is_file() for image in images)


def test_empty_or_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(RunReportError, match="nothing to report in .*pass the folder a prune, eval or demo run wrote"):
        write_run_report(tmp_path)
    with pytest.raises(RunReportError, match="does not exist"):
        write_run_report(tmp_path / "absent")
    assert not list(tmp_path.iterdir())


def test_unreadable_files_are_noted_not_fatal(tmp_path, run_dir):
    (tmp_path / "scores.json").write_text((run_dir / "scores.json").read_text())
    (tmp_path / "eval_broken.json").write_text("{not json")
    (tmp_path / "bench.json").write_text(json.dumps({"format": "something else"}))
    text = write_run_report(tmp_path).read_text()
    assert "`eval_broken.json` could not be read" in text
    assert "`bench.json` is not a `prunekit.bench/1` file" in text


def test_command_shape(run_dir, capsys, tmp_path):
    help_text, add_arguments, run = REPORT_COMMAND
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(run_dir)])) == 0
    assert "wrote" in capsys.readouterr().out
    assert run(parser.parse_args([str(tmp_path)])) == 2
    assert "prunekit report: error: nothing to report" in capsys.readouterr().err


# ----------------------------------------------------------------------------- labels, the card, trust


def test_quality_points_are_named_dense_pruned_and_recovered(run_dir, tmp_path, monkeypatch):
    import shutil

    from prunekit.report import run_report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    recovered = tmp_path / "recovered"  # outside the run, so the pruned model stays the run's final one
    shutil.copytree(run / "model", recovered)
    provenance = json.loads((recovered / "prunekit.json").read_text())
    (recovered / "prunekit.json").write_text(json.dumps({**provenance, "recovery": {"settings": {}}}))
    (run / "eval_recovered.json").write_text(json.dumps(
        _eval_json("recovered", recovered, provenance["params"]["total"], 25.0)))
    drawn = []
    plot = run_report.plot_quality_vs_size
    monkeypatch.setattr(run_report, "plot_quality_vs_size",
                        lambda points, path, **kwargs: drawn.append((points, kwargs)) or plot(points, path, **kwargs))
    write_run_report(run)
    (points, kwargs), = drawn
    assert sorted((p["label"], p["perplexity"]) for p in points) == [("pruned", 30.0), ("recovered", 25.0)]
    assert kwargs["dense"]["perplexity"] == 20.0


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end >= 0 else None]


def test_the_report_writes_the_final_models_card_with_the_same_figures(run_dir, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    report = write_run_report(run).read_text()
    card = (run / "model" / "README.md").read_text()
    assert yaml.safe_load(card[4:card.index("\n---", 4)])["library_name"] == "transformers"
    assert "The model card `model/README.md` was written again" in report
    perplexity = _section(report, "### Perplexity").strip()
    assert "| pruned (`pruned`) | wikitext2 | 64 | 100 | 30.00 |" in perplexity
    assert "| dense (`dense`) | wikitext2 | 64 | 100 | 20.00 |" in perplexity
    assert perplexity in card  # the same table, row for row
    speed = report[report.index("| metric | pruned | dense"):].split("\n\n")[0]
    assert speed in card and "1.20× (1.10–1.32)" in speed
    removed = _section(report, "### What was removed").split("\n", 2)[2].strip().split("\n\n")[0]
    assert removed in card


def test_an_unreliable_speed_row_is_marked_in_the_report(tmp_path):
    record = _bench_json(100, 120)
    timings = record["speed"]["model"]["timings"]
    timings["prefill_tokens_per_s"] = {"median": 12.0, "low": 4.0, "high": 12.5}  # repeats on a busy machine
    (tmp_path / "bench.json").write_text(json.dumps(record))
    text = write_run_report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| prefill tokens/s"))
    assert "| unreliable |" in row and "×" not in row.split("|")[4]
    assert "prefill tokens/s (2 x 32): unreliable, not a result: the pruned model's repeats spread 71%" in text
