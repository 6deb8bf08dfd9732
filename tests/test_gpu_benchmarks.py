"""The GPU speed benchmark runs where CI can run it: a clear refusal without a GPU, and a
tiny model on the CPU through the same code (planning, surgery on meta, static-cache decode)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_the_script_says_so_in_one_sentence(tmp_path):
    result = run_script("--out", str(tmp_path / "speed.json"))
    assert result.returncode == 2
    assert "no CUDA GPU is visible here" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "speed.json").exists()


def test_tiny_model_on_cpu_measures_every_way_against_the_dense_model(tmp_path):
    out = tmp_path / "speed.json"
    result = run_script("--shape", "tiny", "--device", "cpu", "--targets", "0.35", "--attention-targets", "0.1",
                        "--repeats", "1", "--decode-steps", "2", "--decode-batches", "1", "--decode-modes", "eager",
                        "--prefill", "1x64", "--context", "16", "--sweep", "", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["models"]) == {"ffn-35", "ffn-35+37", "width-35", "depth-35", "attention-10", "mixed-35"}
    for name, model in record["models"].items():
        assert "error" not in model, (name, model.get("error"))
        speedup = model["speedup"]
        prefill = model["prefill"]
        assert speedup["prefill"]["measured"] == pytest.approx(prefill["pruned"]["median"] / prefill["dense"]["median"])
        assert speedup["prefill"]["ideal"] > 1 and prefill["pruned"]["min"] <= prefill["pruned"]["median"]
        assert "decode_b1_eager" in speedup
    # the planner's shapes: uniform widths are multiples of --ffn-multiple, the unaligned variant is not
    assert all(w % 128 == 0 for w in record["models"]["ffn-35"]["shape"]["ffn_widths"])
    assert all(w % 128 == 37 for w in record["models"]["ffn-35+37"]["shape"]["ffn_widths"])
    assert record["models"]["depth-35"]["shape"]["layers"] < record["dense"]["shape"]["layers"]
    table = run_script("--markdown", str(out)).stdout
    assert "| ffn-35 |" in table and "prefill" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_decode_mode_benchmark_refuses_without_a_gpu(tmp_path):
    script = SCRIPT.parent / "gpu_bench_decode.py"
    env = {"PYTHONPATH": f"{SCRIPT.parents[1] / 'src'}:{SCRIPT.parent}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "d.json")], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 2 and "no CUDA GPU is visible here" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "d.json").exists()
