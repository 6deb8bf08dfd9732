"""The demo as `make demo` runs it (`prunekit demo --out DIR`: recipes/demo.yaml, prune, distil,
evaluate, bench, report) on the real SmolLM2-135M, checked against the committed record that
benchmarks/demo_cpu.py made of the same command (benchmarks/results/demo_cpu/) and against the
block the README prints, which is generated from that record (`demo_cpu.py --markdown`).

Tolerances (what the README's block claims, on the same 2-core CPU):
- parameter counts and the ideal speedup (FLOPs) are the plan's: equal;
- perplexities (WikiText-2, held-out before and after recovery) within 3%: the same seed on the
  same CPU repeats them, but another thread count or BLAS rounds differently and OBS's greedy
  choices can flip on a tie;
- measured speedups within 25% where neither the record nor the run flags the row unreliable (the
  bench flags a row whose repeats spread over 25%: the machine was busy; the committed record, made
  while other jobs ran, flags four of five), and no stage more than 2 times slower than printed:
  the record was made on a loaded machine (it keeps the load average at its start), so a run alone
  may be much faster, which is no regression.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from prunekit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_cpu import RECORD, STAGES, demo_block  # noqa: E402

PERPLEXITY_TOLERANCE = 0.03
SPEEDUP_TOLERANCE = 0.25
TIME_FACTOR = 2.0


def readme_demo_block() -> str:
    """The code block under the README's 'With the data directory, it printed' paragraph."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```", text.index("With the data directory, it printed"))
    body = text[text.index("\n", start) + 1:]
    return body[:body.index("```")].rstrip("\n")


def parse_block(block: str) -> dict:
    """{"seconds": {stage: s}, "rows": {row name: (original, final)}} from the printed block."""
    seconds, rows = {}, {}
    for line in block.splitlines():
        done = re.fullmatch(r"\[(\w+)\] done in (\d+) s", line.strip())
        if done:
            seconds[done[1]] = float(done[2])
            continue
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    return {"seconds": seconds, "rows": rows}


def _number(cell: str) -> float:
    return float(re.match(r"[\d.]+", cell)[0])


def unreliable_rows(run_dir: Path) -> set[str]:
    """The printed names of the speed rows that the run's bench flagged unreliable."""
    flagged = json.loads((run_dir / "bench.json").read_text())["speed"]["unreliable"]
    return {f"speed: {metric.replace('_', ' ')}" for metric in flagged}


def assert_block_matches(printed: dict, measured: dict, unreliable: set[str] = frozenset()) -> None:
    """Every figure of `printed` (parse_block of the README) against `measured` (parse_block of a
    run); the measured speedups of the `unreliable` rows are not compared."""
    assert set(printed["rows"]) == set(measured["rows"]), (printed["rows"], measured["rows"])
    for name, cells in printed["rows"].items():
        for shown, got in zip(cells, measured["rows"][name]):
            if "parameters" in name or "ideal" in name:
                assert shown == got, (name, shown, got)
            elif name.startswith(("perplexity", "recovery")):
                assert _number(got) == pytest.approx(_number(shown), rel=PERPLEXITY_TOLERANCE), (name, shown, got)
            elif name not in unreliable:
                assert _number(got) == pytest.approx(_number(shown), rel=SPEEDUP_TOLERANCE), (name, shown, got)
    assert set(printed["seconds"]) == set(STAGES)
    for stage, shown in printed["seconds"].items():
        if stage != "report":  # seconds, and printed rounded to whole ones
            assert measured["seconds"][stage] <= shown * TIME_FACTOR, (stage, shown, measured)


@pytest.mark.slow
def test_the_demo_as_make_demo_runs_it_gives_the_readme_figures(tmp_path, shared_data_dir, monkeypatch, capsys):
    if shared_data_dir is None:
        pytest.skip("the README's demo block was recorded with the shared data directory (C4, WikiText-2)")
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(shared_data_dir))
    # the README prints what the committed record holds
    assert readme_demo_block() == demo_block(RECORD), "paste `python benchmarks/demo_cpu.py --markdown` into README.md"

    assert cli_main(["demo", "--out", str(tmp_path / "demo")]) == 0  # what `make demo` runs
    out = capsys.readouterr().out
    assert "report: " in out and (tmp_path / "demo" / "report.md").is_file()
    records = {stage: json.loads((tmp_path / "demo" / "records" / f"{stage}.json").read_text()) for stage in STAGES}
    recorded = {stage: json.loads((RECORD / "records" / f"{stage}.json").read_text()) for stage in STAGES}
    assert records["prune"]["inputs"]["prune"] == recorded["prune"]["inputs"]["prune"]  # the same recipe
    assert_block_matches(parse_block(readme_demo_block()), parse_block(demo_block(tmp_path / "demo")),
                         unreliable_rows(RECORD) | unreliable_rows(tmp_path / "demo"))
    card = (tmp_path / "demo" / "recovered" / "README.md").read_text()
    assert card.startswith("---") and "pruned" in card


def test_the_block_parser_reads_every_row_of_the_printed_table():
    """The fast half: the committed record's block parses into every row, stage and figure the
    slow test compares, and a perplexity off by more than the tolerance fails."""
    block = parse_block(demo_block(RECORD))
    assert set(block["seconds"]) == set(STAGES)
    assert {"parameters", "non-embedding parameters", "perplexity, wikitext2", "recovery: held-out perplexity",
            "speed: ideal (FLOPs per token)"} <= set(block["rows"])
    assert_block_matches(block, block)
    off = {**block, "rows": {**block["rows"], "perplexity, wikitext2": (
        block["rows"]["perplexity, wikitext2"][0], f"{_number(block['rows']['perplexity, wikitext2'][1]) * 1.05:.2f}")}}
    with pytest.raises(AssertionError):
        assert_block_matches(block, off)
    assert unreliable_rows(RECORD) <= set(block["rows"])  # the flags name rows of the table
