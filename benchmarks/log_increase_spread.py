"""How much more later layers should lose: the default prune (magnitude order, log_increase budgets,
FFN channels, structured OBS) of SmolLM2-135M with `--allocation-option spread=S` for several S,
judged on two data sets that calibration never reads: WikiText-2 (512-token windows, every 16th)
and held-out C4 documents.

Calibration: C4 128 x 512 (seed 0) drawn from the first 800 documents of the local shard; the
held-out C4 rows (32 x 512) come from the other 200. Every prune runs `prune_loaded`, the step
`prunekit prune` runs, on a fresh copy of the dense model.

    python benchmarks/log_increase_spread.py --ratios 0.2,0.35,0.5 --spreads 1.5,3,6 \
        --out benchmarks/results/log_increase_spread_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.huggingface import versions
from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded
from prunekit.recover.train import held_out_perplexity

TRAIN_DOCUMENTS = 800  # of the 1,000 in the local C4 shard; the rest are held out


def split_c4(data_dir: Path, work: Path) -> tuple[Path, Path]:
    lines = [line for line in (data_dir / "c4" / "c4_en_train_shard00000_first1000.jsonl")
             .read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held_out = work / "c4_train.jsonl", work / "c4_held_out.jsonl"
    train.write_text("\n".join(lines[:TRAIN_DOCUMENTS]) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(lines[TRAIN_DOCUMENTS:]) + "\n", encoding="utf-8")
    return train, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--spreads", default="1.5,3,6")
    parser.add_argument("--c4-rows", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
        spreads = [float(s) for s in args.spreads.split(",")]
    except ValueError:
        parser.error("--ratios and --spreads take comma-separated numbers, e.g. 0.2,0.35 and 1.5,3")
    if args.data_dir is None or not (Path(args.data_dir) / "c4").is_dir():
        parser.error("--data-dir (or PRUNEKIT_DATA_DIR) must name the shared data folder with c4/ and wikitext-2-raw/")
    data_dir = Path(args.data_dir)
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    train, held_out = split_c4(data_dir, Path(tempfile.mkdtemp(prefix="spread-")))
    calibration = CalibrationSettings(source=str(train), n_samples=128, seq_len=512, seed=0)
    ids = calibration_tokens(str(train), tokenizer, n_samples=128, seq_len=512, seed=0)
    c4_ids = calibration_tokens(str(held_out), tokenizer, n_samples=args.c4_rows, seq_len=512, seed=0)

    def evaluate(model) -> dict:
        wiki = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                          window_every=args.eval_every, protocol="raw", batch_size=4, data_dir=data_dir,
                          progress=False).perplexity
        with torch.no_grad():
            c4 = held_out_perplexity(model, c4_ids, c4_ids.clone(), 4, torch.device("cpu"))
        return {"wikitext2": round(wiki, 3), "c4_held_out": round(c4, 3)}

    record = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
              "command": " ".join(["python", "benchmarks/log_increase_spread.py", *sys.argv[1:]]),
              "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "device": f"cpu x{torch.get_num_threads()}", "versions": versions(),
              "calibration": f"C4 128 x 512 (seed 0) from the first {TRAIN_DOCUMENTS} documents",
              "c4_held_out": f"{args.c4_rows} x 512 from the other documents",
              "dense": evaluate(dense), "runs": []}
    for ratio in ratios:
        for spread in spreads:
            model = copy.deepcopy(dense)
            settings = PruneSettings(target=ratio, calibration=calibration, allocation_options={"spread": spread})
            started = time.perf_counter()
            pruned = prune_loaded(model, tokenizer, settings, progress=False, calibration=(ids, None))
            run = {"ratio": ratio, "spread": spread, "prune_seconds": round(time.perf_counter() - started, 1),
                   "removed_non_embedding": pruned["removed"]["non-embedding"],
                   "ffn_widths": [layer.intermediate_size for layer in prunekit.model_structure(model).layers],
                   **evaluate(model)}
            print(f"{ratio} spread {spread}: WikiText-2 {run['wikitext2']}  C4 {run['c4_held_out']}", flush=True)
            record["runs"].append(run)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
