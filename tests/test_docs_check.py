"""`make docs-check` (tools/docs_check.py): every measured figure in the docs matches its record to the
digits printed, and a figure from a record older than its script says so.

The checker is tried on small synthetic docs and records in a throw-away git repository; the last
test runs it on the project's own docs, so `make test` fails when a figure drifts from its record.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_check", ROOT / "tools" / "docs_check.py")
docs_check = importlib.util.module_from_spec(_spec)
sys.modules["docs_check"] = docs_check
_spec.loader.exec_module(docs_check)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the check dates records by git history")

RECORD = {"command": "python benchmarks/bench.py --out benchmarks/results/speed.json",
          "dense": {"perplexity": 29.455, "seconds": 462.0},
          "runs": [{"name": "a", "perplexity": 49.386, "tokens_per_second": 1501.4, "gap_closed": 0.354},
                   {"name": "b", "perplexity": 81.116, "tokens_per_second": 1870.2, "gap_closed": 0.43}],
          "verdict": "needs at least 165.5 GiB (weights 29.9 GiB), but 122.3 GiB are free"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repository with a benchmark script and its record, committed in that order."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "bench.py").write_text("print('v1')\n")
    (tmp_path / "benchmarks" / "results" / "speed.json").write_text(json.dumps(RECORD))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "script and its record")
    return tmp_path


def _check(repo: Path, text: str) -> docs_check.Report:
    doc = repo / "DOC.md"
    doc.write_text(text)
    return docs_check.check(repo, [doc])


def _change_script(repo: Path) -> str:
    (repo / "benchmarks" / "bench.py").write_text("print('v2')\n")
    _git(repo, "commit", "-q", "-am", "the script changes after its record")
    return _git(repo, "rev-parse", "HEAD")


def test_a_figure_that_matches_its_record_passes_and_is_counted(repo):
    report = _check(repo, "Dense 29.46 in 7.7 min. <!-- fig 29.46@speed.json#dense/perplexity; "
                          "7.7@{speed.json#dense/seconds}/60 -->\n")
    assert report.failures == []
    assert report.checked == 2


def test_a_figure_that_differs_from_its_record_fails_naming_the_line_and_the_value(repo):
    report = _check(repo, "Intro.\n\nThe default scores 49.5. <!-- fig 49.5@speed.json#runs/0/perplexity -->\n")
    assert len(report.failures) == 1
    assert report.failures[0].startswith("DOC.md:3: 49.5 differs from its record")
    assert "49.386" in report.failures[0] and report.failures[0].endswith(")")


def test_figures_are_compared_to_the_digits_printed(repo):
    def fails(printed: str) -> bool:
        return bool(_check(repo, f"It scores {printed}. <!-- fig {printed}@speed.json#runs/0/perplexity -->\n").failures)

    # the record holds 49.386
    assert not fails("49.39") and not fails("49.4") and not fails("49")
    assert not fails("49.386") and not fails("49.3860")
    assert fails("49.38") and fails("49.3") and fails("50") and fails("49.3861")


def test_a_measured_looking_figure_without_a_reference_fails(repo):
    report = _check(repo, "Prefill runs at 1,501 tok/s and decode at 1.26x; perplexity 80.91.\n")
    problems = " ".join(report.failures)
    assert len(report.failures) == 3
    assert "1,501tok/s looks measured and has no reference" in problems
    assert "1.26x" in problems and "80.91" in problems
    assert all(f.startswith("DOC.md:1: ") for f in report.failures)


def test_settings_dates_versions_code_and_identifiers_are_not_figures(repo):
    text = ("<!-- settings: 20%, 35% -->\n"
            "Pruned by 20% and 35% of SmolLM2-135M on an H100 80GB, torch 2.11.0, transformers 5.17, 2026-11-30,\n"
            "`--lr 0.0002`, commit bd9be93, 128 x 512 tokens, Llama-3.2-1B.\n\n"
            "```\nprune done in 154 s, 1.26x\n```\n")
    assert _check(repo, text).failures == []


def test_a_line_marked_not_measured_and_a_dash_reference_are_accepted_and_counted(repo):
    report = _check(repo, "The goal is 120 s and 0.95 of ideal. <!-- not-measured: goals -->\n"
                          "Damping 0.01 gives 49.39. <!-- fig 0.01@-; 49.39@speed.json#runs/0/perplexity -->\n")
    assert report.failures == []
    assert report.not_measured == 3 and report.checked == 1


def test_a_reference_to_a_missing_record_or_key_fails(repo):
    report = _check(repo, "A 49.39. <!-- fig 49.39@nowhere.json#runs/0/perplexity -->\n"
                          "B 49.39. <!-- fig 49.39@speed.json#runs/7/perplexity -->\n"
                          "C 49.39. <!-- fig 49.39@runs/0/perplexity -->\n")
    problems = report.failures
    assert "record nowhere.json does not exist" in problems[0]
    assert "has no key runs/7/perplexity" in problems[1]
    assert "no record: name one with <!-- record: FILE.json -->" in problems[2]


def test_a_record_declared_above_serves_the_lines_of_its_section(repo):
    text = ("## Speed\n<!-- record: speed.json -->\n\n| run | ppl |\n|---|---|\n"
            "| a | 49.39 | <!-- fig 49.39@runs/0/perplexity -->\n\n## Next\n\nx 81.12 <!-- fig 81.12@runs/1/perplexity -->\n")
    report = _check(repo, text)
    assert report.checked == 1
    assert len(report.failures) == 1 and report.failures[0].startswith("DOC.md:10: 81.12: no record")


def test_expressions_bounds_and_numbers_inside_strings(repo):
    text = ("Closes 35% and 43% (1.25x faster). <!-- fig 35@100*{speed.json#runs/0/gap_closed}; "
            "43@100*{speed.json#runs/1/gap_closed}; 1.25@{speed.json#runs/1/tokens_per_second}/{speed.json#runs/0/tokens_per_second} -->\n"
            "Within 5% of it; at least 1,400 tok/s. <!-- fig 5@>=100*abs(1-{speed.json#runs/0/perplexity}/49); "
            "1,400@<=speed.json#runs/0/tokens_per_second -->\n"
            "It needs 165.5 GiB. <!-- fig 165.5@speed.json#verdict[0] -->\n")
    report = _check(repo, text)
    assert report.failures == [] and report.checked == 6
    wrong = _check(repo, "Within 0.5% of it. <!-- fig 0.5@>=100*abs(1-{speed.json#runs/0/perplexity}/49) -->\n")
    assert "given as a bound" in wrong.failures[0]


def test_a_figure_without_a_record_must_say_so_in_its_paragraph(repo):
    silent = _check(repo, "It took 6.7 minutes. <!-- fig 6.7@norecord -->\n")
    assert "marked norecord but the text does not say so" in silent.failures[0]
    said = _check(repo, "It took 6.7 minutes (no record: runs/ is not committed). <!-- fig 6.7@norecord -->\n")
    assert said.failures == [] and said.no_record == 1


def test_a_record_older_than_its_script_is_accepted_only_when_the_docs_say_old(repo):
    line = "It scores 49.39. <!-- fig 49.39@speed.json#runs/0/perplexity -->\n"
    assert _check(repo, line).failures == []  # the record is as new as its script
    commit = _change_script(repo)
    unmarked = _check(repo, line)
    assert len(unmarked.failures) == 1
    assert f"made before benchmarks/bench.py changed in {commit[:9]}" in unmarked.failures[0]
    assert f"(old: made before {commit[:9]})" in unmarked.failures[0]  # the fix names the mark to write
    marked = _check(repo, f"It scores 49.39 (old: made before {commit[:7]}). <!-- fig 49.39@speed.json#runs/0/perplexity -->\n")
    assert marked.failures == [] and marked.old == 1 and marked.checked == 1
    # an old figure still has to match its record
    wrong = _check(repo, f"It scores 49.5 (old: made before {commit[:7]}). <!-- fig 49.5@speed.json#runs/0/perplexity -->\n")
    assert len(wrong.failures) == 1 and "differs from its record" in wrong.failures[0]


def test_a_script_change_declared_harmless_in_provenance_does_not_age_the_record(repo):
    commit = _change_script(repo)
    line = "It scores 49.39. <!-- fig 49.39@speed.json#runs/0/perplexity -->\n"
    assert len(_check(repo, line).failures) == 1
    (repo / "benchmarks" / "results" / "provenance.json").write_text(json.dumps(
        {"speed.json": {"script": "benchmarks/bench.py", "not_affected_by": {commit[:7]: "prints another word"}}}))
    assert _check(repo, line).failures == []


def test_an_old_mark_where_no_figure_is_old_fails(repo):
    report = _check(repo, "It scores 49.39 (old: made before abcdef1). <!-- fig 49.39@speed.json#runs/0/perplexity -->\n")
    assert len(report.failures) == 1 and "names no figure of this block" in report.failures[0]


def test_a_table_is_one_block_with_its_caption_for_the_old_mark(repo):
    commit = _change_script(repo)
    text = (f"Speed of the runs (old: made before {commit[:7]}):\n\n| run | ppl |\n|---|---|\n"
            "| a | 49.39 | <!-- fig 49.39@speed.json#runs/0/perplexity -->\n"
            "| b | 81.12 | <!-- fig 81.12@speed.json#runs/1/perplexity -->\n\nLater text 81.12. <!-- fig 81.12@speed.json#runs/1/perplexity -->\n")
    report = _check(repo, text)
    assert report.old == 2
    assert len(report.failures) == 1 and report.failures[0].startswith("DOC.md:8: 81.12 comes from speed.json")


def test_a_record_whose_script_nobody_names_fails_until_provenance_names_it(repo):
    (repo / "benchmarks" / "results" / "typed.json").write_text(json.dumps({"seconds": 12.3}))
    line = "It took 12.3 s. <!-- fig 12.3@typed.json#seconds -->\n"
    assert "nothing says which script made typed.json" in _check(repo, line).failures[0]
    (repo / "benchmarks" / "results" / "provenance.json").write_text(json.dumps({"typed.json": {"script": None}}))
    assert _check(repo, line).failures == []


def test_suggest_finds_the_record_keys_of_a_table_row(repo, monkeypatch, capsys):
    monkeypatch.setattr(docs_check, "ROOT", repo)
    doc = repo / "DOC.md"
    doc.write_text("| a | 49.39 | 1.25x |\n")
    docs_check.annotate(doc, 1, 1, ["speed.json"], write=True)
    assert doc.read_text() == ("| a | 49.39 | 1.25x | <!-- fig 49.39@speed.json#runs/0/perplexity; 1.25@? -->\n")
    assert "49.39@speed.json#runs/0/perplexity" in capsys.readouterr().out


def test_the_projects_docs_match_their_records():
    """The docs named in CONTRIBUTING.md: README, BENCHMARKS, GPU_BENCHMARKS and docs/*.md."""
    report = docs_check.check()
    assert report.failures == [], "\n".join(report.failures[:20]) + "\n(run `make docs-check`; CONTRIBUTING.md says how to fix)"
    assert report.checked > 1000


def test_make_docs_check_prints_its_counts():
    if shutil.which("make") is None:
        pytest.skip("needs make")
    result = subprocess.run(["make", "-s", "docs-check", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "figures checked against their records" in result.stdout and "0 problems" in result.stdout
