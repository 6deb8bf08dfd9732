"""`prunekit eval` and `prunekit bench` end to end on tiny model directories, and their errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

import prunekit
from prunekit.data import DataError
from prunekit.evaluate import run as run_module
from prunekit.evaluate.commands import BENCH_COMMAND, EVAL_COMMAND
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.run import bench_models, evaluate_model, format_bench_table, format_eval_table
from prunekit.evaluate.tasks import EvalError
from prunekit.models.loading import ModelLoadError

# About 1,100 bytes, so about 1,100 tokens under the byte tokenizer: 17 windows of 64.
TEXT = (
    "The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean Sea.\n\n"
    "Wind turbines convert the kinetic energy of the wind into electrical power; some stand far offshore.\n\n"
) * 5 + "Ünïcödé text keeps its bytes: 東京, Zürich, naïve café.\n"
BENCH_SIZES = ["--prefill-batch", "1", "--prefill-len", "16", "--decode-batches", "1,2", "--decode-context", "8",
               "--decode-tokens", "3", "--warmup", "0", "--repeats", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama directory and a wider baseline (max_position_embeddings 128)."""
    root = tmp_path_factory.mktemp("models")
    prunekit.save_model(tiny_model("llama"), byte_tokenizer(), root / "model")
    prunekit.save_model(tiny_model("llama", seed=1, intermediate_size=160), byte_tokenizer(), root / "baseline")
    return {"model": root / "model", "baseline": root / "baseline"}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def command(spec: tuple, *argv: object) -> int:
    """Run a command tuple as prunekit.cli would: its parser, then its run function."""
    _help, add_arguments, run = spec
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([str(arg) for arg in argv]))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was raised")

    monkeypatch.setattr(run_module, "load", refuse)


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("windows", [[], ["--stride", "24"], ["--window-every", "3"]])
def test_eval_matches_perplexity_and_records_its_protocol(models, text_file, tmp_path, capsys, windows):
    out = tmp_path / "results" / "eval.json"
    import resource

    resident_before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    assert command(EVAL_COMMAND, models["model"], "--ppl", text_file, "--seq-len", "64", *windows, "--json", out) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    entry = report["perplexity"][str(text_file)]

    model, tokenizer = prunekit.load(models["model"])
    stride = int(windows[1]) if windows[:1] == ["--stride"] else None
    every = int(windows[1]) if windows[:1] == ["--window-every"] else 1
    expected = perplexity(model, tokenizer, dataset=str(text_file), seq_len=64, stride=stride, window_every=every,
                          progress=False)
    assert entry["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert (entry["n_windows"], entry["n_tokens"]) == (expected.n_windows, expected.n_tokens)
    protocol = entry["protocol"]
    assert protocol["dataset"] == str(text_file) and protocol["stream_tokens"] == len(TEXT.encode())
    assert (protocol["seq_len"], protocol["stride"], protocol["window_every"]) == (64, stride, every)
    assert protocol["dtype"] == "float32" and protocol["text_protocol"] == "raw" and not protocol["special_tokens"]
    assert entry["seconds"] >= 0 and report["model"]["spec"] == str(models["model"])
    assert report["model"]["device"] == "cpu"
    assert report["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert {"torch", "transformers", "prunekit"} <= set(report["environment"]["versions"])
    assert report["environment"]["machine"]["cpu_cores"] >= 1 and report["tasks"] == {}

    row = next(line for line in printed.splitlines() if line.startswith(str(text_file)))
    assert "64 tokens" in row and f"{entry['perplexity']:.2f}" in row
    assert format_eval_table(report) in printed and f"wrote {out}" in printed
    # the evaluation's own peak resident memory: at least what the process held, at most its lifetime peak
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0.9 * resident_before <= report["memory"]["peak_bytes"] <= 1.05 * lifetime_peak  # (their page counts lag)
    assert report["memory"]["estimate_bytes"] > 0
    assert "memory: peak" in printed and "admitted on an estimate" in printed


def test_eval_runs_local_tasks_without_default_perplexity(models, tmp_path, capsys):
    piqa = tmp_path / "data" / "piqa"
    piqa.mkdir(parents=True)
    rows = [{"goal": "Dry wet shoes.", "sol1": "Add ice.", "sol2": "Add paper."},
            {"goal": "Cut bread.", "sol1": "Use a knife.", "sol2": "Use a sponge."}]
    (piqa / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (piqa / "valid-labels.lst").write_text("1\n0\n")
    out = tmp_path / "eval.json"
    assert command(EVAL_COMMAND, models["model"], "--tasks", "piqa", "--data-dir", tmp_path / "data",
                   "--json", out) == 0
    report = json.loads(out.read_text())
    assert report["perplexity"] == {}
    piqa_scores = report["tasks"]["piqa"]
    assert piqa_scores["n"] == 2 and 0 <= piqa_scores["acc"] <= 1 and 0 <= piqa_scores["acc_norm"] <= 1
    assert piqa_scores["protocol"]["num_fewshot"] == 0 and piqa_scores["protocol"]["limit"] is None
    assert any(line.startswith("piqa") for line in capsys.readouterr().out.splitlines())


# ----------------------------------------------------------------------------- bench


def test_bench_puts_model_and_baseline_side_by_side(models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert command(BENCH_COMMAND, models["model"], "--baseline", models["baseline"], *BENCH_SIZES, "--json", out) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    speed = report["speed"]
    assert report["model"]["spec"] == str(models["model"]) and report["baseline"]["spec"] == str(models["baseline"])
    assert report["model"]["dtype"] == speed["settings"]["dtype"] == "bfloat16"
    assert speed["settings"]["repeats"] == 1 and speed["settings"]["decode_batches"] == [1, 2]
    # the CPU decodes eagerly, and the table says so
    assert speed["settings"]["decode"] == "eager"
    assert "decode tokens/s (batch 1, eager)" in printed and "decode: eager (transformers' generate" in printed
    # The baseline's FFN is twice as wide, so the model should ideally be faster.
    assert speed["ideal_speedup"] > 1
    assert set(speed["speedup"]) == set(speed["model"]["timings"]) == set(speed["baseline"]["timings"])
    header = printed.splitlines()[2].split()
    assert header == ["metric", "model", "baseline", "speedup", "ideal"]
    # The table renders the same from the JSON file as from the fresh report.
    assert format_bench_table(report) in printed


# ----------------------------------------------------------------------------- errors, before any load


def _write_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1") * 20)
    (tmp_path / "short.txt").write_text("Too short for a window.")
    (tmp_path / "no_data").mkdir()


EVAL_ERRORS = [
    (["--ppl", "wikitext3"], DataError, r"unknown text source 'wikitext3'.*alpaca, c4, ptb, wikitext2"),
    (["--tasks", "piqa,no_such_task"], EvalError,
     r"unknown task 'no_such_task'; the local tasks are piqa, arc_easy, arc_challenge, hellaswag"),
    (["--tasks", "piqa", "--data-dir", "{tmp}/no_data"], EvalError, r"task piqa needs .*piqa/valid.jsonl"),
    (["--ppl", "{tmp}/missing.txt", "--seq-len", "64"], DataError, r"missing.txt' does not exist"),
    (["--ppl", "{tmp}/empty.txt", "--seq-len", "64"], DataError, r"empty.txt' is empty"),
    (["--ppl", "{tmp}/latin1.txt", "--seq-len", "64"], DataError, r"latin1.txt' is not UTF-8 text"),
    (["--ppl", "{tmp}/short.txt", "--seq-len", "64"], DataError,
     r"short.txt is 23 tokens long under this model's tokenizer, shorter than one window of 64 tokens"),
    (["--ppl", "wikitext2,wikitext2"], EvalError, r"ppl lists 'wikitext2' more than once"),
    (["--seq-len", "256"], EvalError, r"seq_len needs 256 positions but .* has 128; lower it"),
    (["--seq-len", "64", "--stride", "64"], EvalError, r"stride must be below seq_len=64"),
    (["--stride", "8", "--window-every", "2"], EvalError, r"use one of the two"),
    (["--limit", "10"], EvalError, r"no task is named; add tasks or drop limit"),
    (["--batch-size", "0"], EvalError, r"batch_size must be an integer >= 1, got 0"),
    (["--json", "{model}/config.json"], EvalError, r"lies inside the model at"),
]


@pytest.mark.parametrize(("argv", "error", "message"), EVAL_ERRORS)
def test_eval_errors_come_before_the_model_loads(models, tmp_path, no_model_load, argv, error, message):
    _write_inputs(tmp_path)
    argv = [arg.format(tmp=tmp_path, model=models["model"]) for arg in argv]
    with pytest.raises(error, match=message):
        command(EVAL_COMMAND, models["model"], *argv)


BENCH_ERRORS = [
    (["--baseline", "{tmp}/nothing"], ModelLoadError, r"no model at"),
    (["--decode-batches", "1,1"], EvalError, r"decode_batches lists 1 more than once"),
    (["--compile", "--warmup", "1"], EvalError, r"set warmup >= 2"),
    (["--prefill-len", "200"], EvalError, r"prefill_len needs 200 positions but .* has 128"),
    (["--decode-tokens", "1"], EvalError, r"decode_tokens must be an integer >= 2"),
    (["--decode", "graph"], EvalError, r"decode 'graph' replays CUDA graphs, which need the cuda device; on the "
                                       r"CPU time decode eagerly \(--decode eager\)"),
    (["--json", "{tmp}"], EvalError, r"is a folder; name a file"),
    (["--json", "{tmp}/file.txt/bench.json"], EvalError, r"file.txt is not a writable folder"),
]


@pytest.mark.parametrize(("argv", "error", "message"), BENCH_ERRORS)
def test_bench_errors_come_before_the_model_loads(models, tmp_path, no_model_load, argv, error, message):
    (tmp_path / "file.txt").write_text("not a folder")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    with pytest.raises(error, match=message):
        command(BENCH_COMMAND, models["model"], *argv)


@pytest.mark.parametrize("which", [EVAL_COMMAND, BENCH_COMMAND])
def test_cuda_without_a_gpu_is_refused_before_loading(models, no_model_load, monkeypatch, which):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalError, match="no CUDA GPU here; use device 'cpu'"):
        command(which, models["model"], "--device", "cuda")
    with pytest.raises(EvalError, match="unknown device 'tpu'; choose one of cpu, cuda"):
        (evaluate_model if which == EVAL_COMMAND else bench_models)(models["model"], device="tpu")


def test_api_refuses_a_bare_string_for_a_list(models, no_model_load):
    with pytest.raises(EvalError, match=r"ppl must be a list, got the string 'wikitext2'"):
        evaluate_model(models["model"], ppl="wikitext2")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate_model(models["model"], ppl=[], tasks=[])


def test_malformed_lists_are_usage_errors(models, capsys):
    with pytest.raises(SystemExit):
        command(EVAL_COMMAND, models["model"], "--ppl", "wikitext2,,c4")
    assert "has an empty name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command(BENCH_COMMAND, models["model"], "--decode-batches", "1,x")
    assert "not a comma-separated list of integers" in capsys.readouterr().err
