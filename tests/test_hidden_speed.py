"""benchmarks/hidden_speed.py (issue 21) on a tiny random llama: hidden-pruned and FFN-pruned models
are timed beside the dense one in torch and in llama.cpp, the per-layer FFN widths bring the dense
model written as deci as a control, and --markdown prints every figure with its reference."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hidden_speed.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0"], "between 0 and 1"),
    (["--settings", "combined"], "unknown settings ['combined']"),
    (["--quants", "q3"], "unknown GGUF types ['q3']"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, args, message):
    result = run("--model", "no-such-model", *args, "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_pruned_models_are_timed_beside_the_dense_one(tmp_path, shared_data_dir):
    pytest.importorskip("llama_cpp")
    if shared_data_dir is None:
        pytest.skip("needs the shared C4 and WikiText-2 files (PRUNEKIT_DATA_DIR)")
    from conftest import tiny_model
    from test_gguf import bpe_tokenizer

    import prunekit

    prunekit.save_model(tiny_model("llama", max_position_embeddings=1024), bpe_tokenizer(), tmp_path / "dense")
    out = tmp_path / "speed.json"
    result = run("--model", str(tmp_path / "dense"), "--ratios", "0.3", "--multiple", "8", "--calib-samples", "4",
                 "--calib-seq-len", "32", "--quants", "f16", "--repeats", "1", "--rounds", "1", "--threads", "1",
                 "--work", str(tmp_path / "gguf"), "--data-dir", str(shared_data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["dense", "hidden-30", "ffn-30", "dense-as-deci"]
    assert models["hidden-30"]["units"]["hidden"] == 32 and models["hidden-30"]["gguf"]["f16"]["arch"] == "llama"
    assert models["ffn-30"]["units"]["hidden"] == 48 and models["ffn-30"]["gguf"]["f16"]["arch"] == "deci"
    for name in ("hidden-30", "ffn-30"):
        assert models[name]["torch"]["model"]["timings"]["decode_tokens_per_s_batch1"]["median"] > 0
        assert models[name]["torch"]["speedup"]["prefill_tokens_per_s"]["median"] > 0
    for m in models.values():
        assert m["gguf"]["f16"]["generation_tok_s"]["median"] > 0 and m["gguf"]["f16"]["prompt_tok_s"]["median"] > 0
    table = run("--markdown", str(out)).stdout
    rows = [line for line in table.splitlines() if line.startswith(("| dense", "| hidden-30", "| ffn-30"))]
    assert len(rows) == 3 and all("<!-- fig " in row for row in rows)
    assert "Control: the dense model written as `deci`" in table
