"""benchmarks/hidden_recovery.py (issue 21) on a tiny random llama: every setting is pruned, evaluated,
distilled and evaluated again, the record is written model by model and resumed, and --markdown
prints a table whose figures carry references to the record."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hidden_recovery.py"
TINY = ["--ratios", "0.3", "--multiple", "8", "--calib-samples", "4", "--calib-seq-len", "32", "--eval-every", "512",
        "--tokens", "256", "--seq-len", "32", "--batch-size", "2", "--held-out", "2"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from conftest import byte_tokenizer, tiny_model

    import prunekit

    directory = tmp_path_factory.mktemp("hidden_recovery") / "dense"
    prunekit.save_model(tiny_model("llama", max_position_embeddings=512), byte_tokenizer(), directory)
    return str(directory)


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0.2,1.5"], "between 0 and 1"),
    (["--settings", "hidden,depth"], "unknown settings ['depth']"),
    (["--hidden-share", "0"], "--hidden-share"),
    (["--tokens", "100"], "smaller than one optimizer step"),
    (["--resume"], "there is none"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, args, message):
    result = run("--model", "no-such-model", *args, "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_hidden_width_of_the_combined_setting():
    sys.path.insert(0, str(SCRIPT.parent))
    from hidden_recovery import hidden_width

    # SmolLM2: about half of the target from its 576 channels, in moves of 64, at least one
    assert [hidden_width(576, t, 0.5, 64) for t in (0.2, 0.35, 0.5)] == [512, 448, 448]
    assert hidden_width(576, 0.05, 0.5, 64) == 512


def test_every_setting_is_pruned_recovered_and_recorded(tiny_dir, tmp_path, shared_data_dir):
    if shared_data_dir is None:
        pytest.skip("needs the shared C4 and WikiText-2 files (PRUNEKIT_DATA_DIR)")
    out = tmp_path / "r.json"
    first = run("--model", tiny_dir, *TINY, "--settings", "hidden", "--data-dir", str(shared_data_dir), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["setting"] for r in json.loads(out.read_text())["runs"]] == ["hidden"]
    # resumed: the hidden run is kept as it was, the other two are added
    kept = json.loads(out.read_text())["runs"][0]
    rest = run("--model", tiny_dir, *TINY, "--data-dir", str(shared_data_dir), "--out", str(out), "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    record = json.loads(out.read_text())
    runs = {r["setting"]: r for r in record["runs"]}
    assert list(runs) == ["hidden", "ffn", "combined"] and runs["hidden"] == kept
    assert record["previous_commands"] and record["dense"]["held_out_c4"] > 0
    # hidden alone: 2 moves of 8 reach 30% of total parameters; combined: 1 move, the rest by FFN and heads
    assert runs["hidden"]["units"]["hidden"] == 32 and runs["ffn"]["units"]["hidden"] == 48
    assert runs["combined"]["units"]["hidden"] == 40
    assert runs["combined"]["units"]["ffn_channels"] < 4 * 80
    for r in runs.values():
        assert r["removed_total"] >= 0.3 - 0.02
        assert r["recovery"]["total_steps"] == 256 // 32 // 2
        assert r["pruned"]["wikitext2"] > 0 and r["recovered"]["wikitext2"] > 0 and r["pruned"]["held_out_c4"] > 0
        # distillation from the dense model moves the held-out loss toward the dense model's
        assert r["recovered"]["held_out_c4"] != r["pruned"]["held_out_c4"]
    table = run("--markdown", str(out))
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 30%")]
    assert len(rows) == 3 and all("<!-- fig " in row for row in rows)
    assert "hidden + FFN + heads" in table.stdout
    assert f"{runs['combined']['recovered']['wikitext2']:.2f}@r.json#runs/2/recovered/wikitext2" in table.stdout
