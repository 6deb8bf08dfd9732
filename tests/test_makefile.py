"""`make install` takes a CPU build of torch on any machine: the wheel already on this one (pip's
find-links), asked for without any index, else PyTorch's CPU index; it says how long it took."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _install_commands() -> str:
    # -n prints the recipe without running it; -B as if nothing were installed yet
    return subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_torch_comes_from_this_machine_first_then_from_the_cpu_index():
    commands = _install_commands()
    local = commands.index('pip install -qq --no-index --no-deps "torch==2.13.0"')
    fallback = commands.index('|| .venv/bin/python -m pip install -qq --index-url https://download.pytorch.org/whl/cpu '
                              '"torch==2.13.0"')
    everything_else = commands.index("-c constraints-cpu.txt")
    assert local < fallback < everything_else


def test_install_prints_its_time_and_stays_quiet_otherwise():
    commands = _install_commands()
    assert 'echo "installed into .venv in $(( $(date +%s) - start )) s"' in commands
    pip_lines = [line for line in commands.splitlines() if "pip install" in line]
    assert pip_lines and all("-qq" in line for line in pip_lines)


def test_the_cpu_index_can_be_overridden():
    commands = subprocess.run(["make", "-n", "-B", "install", "TORCH_CPU_INDEX=file:///mirror/cpu"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    assert "--index-url file:///mirror/cpu" in commands
