"""The demo as `make demo` runs it: `prunekit demo` (the shipped recipe) on the real SmolLM2-135M."""
from __future__ import annotations

import json

import pytest

from prunekit.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_the_demo_recipe_runs_on_the_embedded_model(tmp_path, shared_data_dir, monkeypatch, capsys):
    if shared_data_dir is not None:
        monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(shared_data_dir))
    assert cli_main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    records = {stage: json.loads((tmp_path / "demo" / "records" / f"{stage}.json").read_text())
               for stage in ("prune", "recover", "evaluate", "bench", "report")}
    assert records["prune"]["figures"]["removed"]["non-embedding"] == pytest.approx(0.30, abs=0.02)
    held_out = records["recover"]["figures"]["held_out_perplexity"]
    assert held_out[-1][1] < held_out[0][1]  # recovery buys perplexity back
    final, original = records["evaluate"]["figures"]["final"], records["evaluate"]["figures"]["original"]
    key = "ppl_wikitext2" if shared_data_dir is not None else "ppl_self_held_out"
    assert original[key] < final[key] < 3 * original[key]
    assert "report: " in out and (tmp_path / "demo" / "report.md").is_file()
    card = (tmp_path / "demo" / "recovered" / "README.md").read_text()
    assert card.startswith("---") and "pruned" in card
