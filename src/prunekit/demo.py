"""The demo: prune the embedded SmolLM2-135M by about 30% of its non-embedding parameters with
prunekit's default setting, then compare the dense and the pruned model side by side.

It needs no data set: with a local data directory it calibrates on C4 and evaluates on
WikiText-2; without one it calibrates on text sampled from the model itself and evaluates on
held-out self-sampled text. The report says which.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from prunekit.data import calibration_tokens, resolve_data_dir
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.speed import benchmark_speed, format_speed_table
from prunekit.export.files import atomic_write_text, check_output_dir
from prunekit.export.huggingface import save_model
from prunekit.models.loading import load
from prunekit.models.structure import model_structure
from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded


def _has_local_data(data_dir) -> bool:
    try:
        root = resolve_data_dir(data_dir)
    except Exception:  # noqa: BLE001 - an unusable data dir means: run on self text
        return False
    return root is not None and (root / "c4").is_dir() and (root / "wikitext-2-raw").is_dir()


def run_demo(model: str, out: Path, *, target: float = 0.3, data_dir: str | None = None, force: bool = False,
             calib_samples: int = 64, calib_seq_len: int = 256) -> dict:
    started = time.perf_counter()
    out = Path(out)
    check_output_dir(out, force=force)
    local = _has_local_data(data_dir)
    calibration = CalibrationSettings(source="c4" if local else "self", n_samples=calib_samples, seq_len=calib_seq_len,
                                      seed=0, data_dir=data_dir)
    settings = PruneSettings(target=target, calibration=calibration, batch_size=8)
    settings.validate()

    print(f"loading {model} ...", flush=True)
    dense, tokenizer = load(model)
    pruned = copy.deepcopy(dense)
    if local:
        def evaluate(m):
            return perplexity(m, tokenizer, dataset="wikitext2", seq_len=512, window_every=16, data_dir=data_dir)
        eval_name = "WikiText-2 test, 512-token windows, every 16th window (37), fp32"
    else:
        held_out = calibration_tokens("self", tokenizer, n_samples=16, seq_len=256, seed=1234, model=dense)

        def evaluate(m):
            return perplexity(m, tokenizer, dataset=held_out.reshape(-1), seq_len=256)  # one window per sample
        eval_name = "held-out text sampled from the dense model (16 x 256 tokens, seed 1234), fp32"

    print(f"pruning {target:.0%} of non-embedding parameters: {settings.criterion}, {settings.allocation} allocation, "
          f"{settings.compensation} compensation, calibration {calibration.source} {calib_samples}x{calib_seq_len}",
          flush=True)
    record = prune_loaded(pruned, tokenizer, settings)
    print("evaluating ...", flush=True)
    before, after = evaluate(dense), evaluate(pruned)
    print("measuring speed (dense and pruned interleaved) ...", flush=True)
    speed = benchmark_speed(pruned, baseline=dense, prefill_batch=4, prefill_len=256, decode_batches=(1, 8),
                            decode_context=64, decode_tokens=32, repeats=3)
    saved = save_model(pruned, tokenizer, out / "model", plan=None, source=model, force=force,
                       extra_provenance={"pruning": {k: v for k, v in record.items() if k != "scores"}})

    s_before, s_after = model_structure(dense), model_structure(pruned)
    table = "\n".join([
        "| | dense | pruned |",
        "|---|---|---|",
        f"| parameters (total) | {s_before.total_params / 1e6:.1f}M | {s_after.total_params / 1e6:.1f}M |",
        f"| non-embedding parameters | {s_before.non_embedding_params / 1e6:.1f}M | "
        f"{s_after.non_embedding_params / 1e6:.1f}M (-{record['removed']['non-embedding']:.1%}) |",
        f"| layers | {s_before.num_layers} | {s_after.num_layers} |",
        f"| perplexity ({eval_name}) | {before.perplexity:.2f} | {after.perplexity:.2f} |",
    ])
    summary = {
        "model": model, "target": target, "data": "local C4 / WikiText-2" if local else "self-sampled text (no data set)",
        "settings": settings.to_dict(), "removed": record["removed"],
        "perplexity": {"dense": before.perplexity, "pruned": after.perplexity, "protocol": eval_name},
        "speed": speed.to_dict(), "saved": str(saved.path), "format": saved.format,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report = (f"# prunekit demo\n\n{model}, {target:.0%} of non-embedding parameters removed "
              f"({settings.criterion}, {settings.allocation}, {settings.compensation} compensation; calibration "
              f"{calibration.source} {calib_samples}x{calib_seq_len}). Data: {summary['data']}.\n\n{table}\n\n"
              f"Speed on this machine, dense and pruned interleaved (CPU, fp32):\n\n```\n{format_speed_table(speed)}\n```\n\n"
              f"The pruned model ({saved.format} Hugging Face directory): `{saved.path}`. "
              f"Total time {summary['seconds']:.0f} s.\n")
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    print("\n" + report)
    return summary


__all__ = ["run_demo"]
