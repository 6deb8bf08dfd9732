"""benchmarks/gpu_default_8b.py on the CPU at toy sizes: the code path the GPU call runs, and a
wrong --runs refused before any model is built or any record written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_default_8b.py"), "--device", "cpu", "--tiny",
                           "--rows", "4", "--seq-len", "32", *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_tiny_cpu_path_records_each_run(tmp_path):
    out = tmp_path / "record.json"
    done = _script("--runs", "default,layer-by-layer", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in runs] == ["default, whole model", "default, layer by layer"]
    assert all("error" not in r and 0.2 < r["removed"]["non-embedding"] < 0.3 for r in runs)


def test_an_unknown_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "record.json"
    done = _script("--runs", "default,defualt", "--out", str(out))
    assert done.returncode == 2
    assert "--runs takes default, layer-by-layer, previous; got defualt" in done.stderr
    assert not out.exists()
