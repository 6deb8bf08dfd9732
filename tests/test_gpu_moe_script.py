"""benchmarks/gpu_moe.py (issue 23's GPU benchmark) runs through the same code on the CPU at toy
sizes: both shapes, dense beside 25% and 50% of the experts removed by prunekit's planner and
surgery, and a record with the memory, prefill, decode and ratios the GPU run reports."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def gpu_moe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_moe_benchmark", BENCHMARKS / "gpu_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu_records_dense_and_both_cuts(tmp_path, monkeypatch, one_thread):
    module = gpu_moe(monkeypatch)
    out = tmp_path / "moe.json"
    assert module.main(["--device", "cpu", "--tiny", "--prefill", "1x16", "--decode-batches", "1,4", "--context", "8",
                        "--decode-steps", "2", "--repeats", "1", "--narrow", "0.5", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["shapes"]) == {"qwen3-30b-a3b", "mixtral-8x7b"}
    assert record["versions"]["torch"] == torch.__version__ and "date" in record["versions"]
    for name, experts, width in (("qwen3-30b-a3b", (16, 12, 8, 8), 32), ("mixtral-8x7b", (8, 6, 4, 4), 96)):
        shape = record["shapes"][name]
        assert shape["layers_built"] == 2
        models = shape["models"]
        assert list(models) == ["dense", "experts-25", "experts-50", "experts-50+width-50"]
        assert [m["shape"]["experts_per_layer"] for m in models.values()] == [[e] for e in experts]
        assert [m["shape"]["expert_width"] for m in models.values()] == [[width]] * 3 + [[width // 2]]
        # top-k stays: a token runs through as many experts as before
        assert len({m["shape"]["experts_per_token"] for m in models.values()}) == 1
        for model in models.values():
            assert set(model["prefill"]) == {"1x16"} and set(model["decode"]) == {"b1_eager", "b4_eager"}
            assert model["prefill"]["1x16"]["tokens_per_s"] > 0 and model["decode"]["b4_eager"]["tokens_per_s"] > 0
        # narrower experts cut the FLOPs a token runs through; fewer experts barely do
        assert shape["ratios"]["experts-50+width-50"]["prefill_flops"] < shape["ratios"]["experts-50"]["prefill_flops"] - 0.03
        for cut in ("experts-25", "experts-50"):
            ratios = shape["ratios"][cut]
            assert ratios["parameters_bytes"] == pytest.approx(
                models[cut]["memory"]["parameters_gib"] / models["dense"]["memory"]["parameters_gib"])
            assert ratios["parameters_bytes"] < 1 and ratios["prefill_flops"] > 0.95
            assert ratios["decode_speedup"]["b1_eager"] == pytest.approx(
                models[cut]["decode"]["b1_eager"]["tokens_per_s"] / models["dense"]["decode"]["b1_eager"]["tokens_per_s"])
            # batch 1 reads top-k experts however many there are; batch 4 reads fewer distinct ones
            assert ratios["experts_read_per_step"]["b1_eager"] == pytest.approx(1.0)
            assert ratios["experts_read_per_step"]["b4_eager"] < 1


def test_uniform_routing_reads_expected_distinct_experts(monkeypatch):
    module = gpu_moe(monkeypatch)
    assert module.experts_read_per_step(128, 8, 1) == pytest.approx(8)
    assert module.experts_read_per_step(8, 2, 1000) == pytest.approx(8)
    assert module.experts_read_per_step(2, 2, 5) == pytest.approx(2)


def test_unknown_shape_is_refused_with_the_choices(monkeypatch, capsys):
    module = gpu_moe(monkeypatch)
    with pytest.raises(SystemExit):
        module.main(["--shapes", "deepseek", "--out", "x.json"])
    assert "choose from ['mixtral-8x7b', 'qwen3-30b-a3b']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_says_so(tmp_path, monkeypatch, capsys):
    module = gpu_moe(monkeypatch)
    assert module.main(["--out", str(tmp_path / "m.json")]) == 2
    assert "no CUDA GPU is visible here" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


def test_markdown_of_the_committed_record_carries_a_reference_that_docs_check_accepts_for_every_figure(
        tmp_path, monkeypatch, capsys):
    """`--markdown` prints GPU_BENCHMARKS.md's tables from the H100 record: every figure in them
    carries its docs-check reference, and every reference reads the value printed."""
    module = gpu_moe(monkeypatch)
    record = BENCHMARKS / "results" / "gpu_moe.json"
    assert module.main(["--markdown", str(record)]) == 0
    printed = capsys.readouterr().out
    for model in ("dense", "experts-25", "experts-50", "experts-50+width-50"):
        assert sum(line.startswith(f"| {model} |") for line in printed.splitlines()) == 6  # 3 tables x 2 shapes
    assert "16 of its 32 layers" in printed and "NVIDIA H100" in printed

    # docs_check on the printed block, in a root that holds only the record (no git history: the
    # provenance entry says no script ages it, so only the values are checked)
    spec = importlib.util.spec_from_file_location("docs_check", BENCHMARKS.parent / "tools" / "docs_check.py")
    docs_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_check", docs_check)  # its dataclasses look their module up
    spec.loader.exec_module(docs_check)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "gpu_moe.json").write_text(record.read_text())
    (results / "provenance.json").write_text(json.dumps({"gpu_moe.json": {"script": None}}))
    doc = tmp_path / "GPU_BENCHMARKS.md"
    doc.write_text("## MoE\n\n" + printed)
    report = docs_check.Report()
    docs_check.check_file(doc, tmp_path, docs_check.Records(tmp_path), report)
    assert report.failures == []
    assert report.checked > 150

    # a record that no longer says what the table prints is caught
    changed = json.loads(record.read_text())
    changed["shapes"]["mixtral-8x7b"]["models"]["dense"]["prefill"]["1x2048"]["tokens_per_s"] *= 1.01
    (results / "gpu_moe.json").write_text(json.dumps(changed))
    report = docs_check.Report()
    docs_check.check_file(doc, tmp_path, docs_check.Records(tmp_path), report)
    assert len(report.failures) == 1 and "differs from its record" in report.failures[0]


def test_out_or_markdown_is_required(monkeypatch, capsys):
    module = gpu_moe(monkeypatch)
    with pytest.raises(SystemExit):
        module.main([])
    assert "--out is required (or --markdown RECORD" in capsys.readouterr().err
