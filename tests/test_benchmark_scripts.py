"""The benchmark scripts refuse bad arguments with one sentence, before loading any model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    # A model name that cannot load: reaching the load would fail differently from the refusals below.
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, message: str, record: Path) -> None:
    """Exit code 2, the message, no traceback, and no record written."""
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not record.exists()


def script_module(script: str, monkeypatch):
    """A benchmark script imported as a module (its sibling imports resolve)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_benchmark", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("methods, message", [
    ("distill:lr", "'lr' is not KEY=VALUE"),
    ("distill:learning_rate=1e-4", "'learning_rate=1e-4' is not KEY=VALUE with KEY one of"),
    ("distill:batch_size=two", "batch_size takes a int, got 'two'"),
    ("distill:lora_targets=q_proj", "lora_targets cannot be set from the command line"),
    ("distill:temperature=0", "temperature must be positive"),
    ("lora:ce_weight=0.5", "ce_weight, hidden_weight and teacher_cache apply to distillation"),
    ("distil", "unknown recovery method 'distil'"),
])
def test_recovery_variants_are_checked_before_any_model_loads(tmp_path, methods, message):
    result = run("recovery.py", "--teacher", str(tmp_path / "no-model"), "--methods", methods,
                 "--out", str(tmp_path / "r.json"))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_recovery_variants_split_on_commas_that_start_a_method(monkeypatch):
    module = script_module("recovery.py", monkeypatch)
    assert module.split_variants("lora,distill:lr=2e-4,temperature=2,full") == [
        "lora", "distill:lr=2e-4,temperature=2", "full"]
    assert module.split_variants("distill:lr=5e-4,ce_weight=0.5") == ["distill:lr=5e-4,ce_weight=0.5"]
    assert module.split_variants("distill:lr=1e-3;distill:lr=2e-4,temperature=2;") == [
        "distill:lr=1e-3", "distill:lr=2e-4,temperature=2"]
    assert module.parse_variant("distill:batch_size=8,precision=fp32") == ("distill", {"batch_size": 8, "precision": "fp32"})


def test_recovery_keep_needs_an_earlier_record(tmp_path):
    result = run("recovery.py", "--teacher", str(tmp_path / "no-model"), "--keep", "--out", str(tmp_path / "none.json"))
    assert result.returncode != 0
    assert "--keep adds to the record at" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_multi_gpu_recovery_benchmark_refuses_without_a_gpu(tmp_path):
    result = run("gpu_recovery_scale.py", "--student", str(tmp_path), "--out", str(tmp_path / "r.json"))
    assert_refused(result, "needs CUDA GPUs; none is visible here", tmp_path / "r.json")


@pytest.mark.parametrize("args, message", [
    (["--student", "x", "--gpus", "one,two"], "--gpus takes process counts such as 1,2; got 'one,two'"),
    (["--student", "x", "--gpus", "0,2"], "--gpus takes process counts of at least 1"),
    (["--gpus", "1,2"], "name either --student, or --random-shape with --tokenizer"),
    (["--student", "x", "--random-shape", "llama-1b", "--tokenizer", "t"], "name either --student, or --random-shape"),
    (["--random-shape", "llama-1b"], "name either --student, or --random-shape with --tokenizer"),
    (["--student", "x", "--gpus", "1", "--shard"], "--shard needs at least 2 processes"),
    (["--student", "x", "--gpus", ""], "nothing to run: give --gpus counts, --shard N, or both"),
])
def test_multi_gpu_recovery_benchmark_checks_its_arguments_first(tmp_path, args, message):
    (tmp_path / "work").mkdir()
    args = args + ["--work", str(tmp_path / "work")]
    result = run("gpu_recovery_scale.py", *args, "--out", str(tmp_path / "r.json"))
    assert_refused(result, message, tmp_path / "r.json")


def test_multi_gpu_recovery_benchmark_keeps_out_of_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ddp-1").mkdir()
    result = run("gpu_recovery_scale.py", "--student", "x", "--work", str(tmp_path / "mine"),
                 "--out", str(tmp_path / "r.json"))
    assert_refused(result, "holds files this script did not write", tmp_path / "r.json")
    assert (tmp_path / "mine" / "ddp-1").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--prefixes", "8,x"], "--prefixes takes row counts such as 8,16,32; got '8,x'"),
    (["--prefixes", "0,8"], "--prefixes and --rows take counts of at least 1"),
    (["--rows", "0"], "--prefixes and --rows take counts of at least 1"),
])
def test_sensitivity_rows_benchmark_checks_its_arguments_before_loading(tmp_path, args, message):
    result = run("sensitivity_rows.py", "--model", str(tmp_path / "no-model"), *args, "--out", str(tmp_path / "r.json"))
    assert_refused(result, message, tmp_path / "r.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("script, message", [("self_text_speed.py", "needs a CUDA GPU; none is visible here"),
                                             ("gpu_eval_device.py", "with the CPU; no GPU is visible here")])
def test_gpu_only_scripts_refuse_without_a_gpu(tmp_path, script, message):
    result = run(script, "--tokenizer", str(tmp_path), "--out", str(tmp_path / "r.json"))
    assert_refused(result, message, tmp_path / "r.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_stage_memory_benchmark_refuses_without_a_gpu(tmp_path):
    result = run("gpu_stage_memory.py", "--shape", "tiny", "--out", str(tmp_path / "r.json"))
    assert_refused(result, "what stages leave on a CUDA GPU; no GPU is visible here", tmp_path / "r.json")


def test_self_text_speed_checks_its_batch_sizes_first(tmp_path):
    result = run("self_text_speed.py", "--tokenizer", str(tmp_path), "--batch-sizes", "2048,many",
                 "--out", str(tmp_path / "r.json"))
    assert_refused(result, "--batch-sizes takes row counts such as 2048,4096; got '2048,many'", tmp_path / "r.json")


def test_multi_gpu_recovery_benchmark_launches_the_recover_command_it_describes(tmp_path, monkeypatch):
    import argparse

    gpu_recovery_scale = script_module("gpu_recovery_scale.py", monkeypatch)

    args = argparse.Namespace(student="s", teacher="t", method="distill", data="d.txt", tokens=1000, seq_len=64,
                              batch_size=2, data_dir=None, activation_checkpointing=True)
    sharded = gpu_recovery_scale.launch_command(args, 2, True, tmp_path / "out")
    assert sharded[sharded.index("--num_processes") + 1] == "2" and "--multi_gpu" in sharded
    assert sharded[-2:] == ["--activation-checkpointing", "--shard"]
    single = gpu_recovery_scale.launch_command(argparse.Namespace(**{**vars(args), "activation_checkpointing": False}),
                                               1, False, tmp_path / "out")
    assert "--multi_gpu" not in single and "--shard" not in single and "--activation-checkpointing" not in single
