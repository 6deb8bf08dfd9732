"""How many calibration rows do head and KV-group sensitivities need? (issue 8)

Sensitivity measures KV groups and heads on the first rows that hold `fine_tokens` tokens
(prunekit's default: 16,384) while layers and sublayers see every row; on a Llama-3-8B shape
with 128 x 2048 calibration tokens that is what brings the full analysis under 15 minutes. This
script measures what the shortcut costs in ranking quality on real weights: it scores the
heads and KV groups of a model on blocks of rows (1-8, 9-16, 17-32, 33-64, 65-128), combines
the blocks into the loss increase on the first 8, 16, 32, 64 and 128 rows (a token-weighted
mean: the increase on a set of rows is the mean over its tokens), and compares each prefix with
all rows: Spearman rank correlation, and the overlap of the least important 35% (the heads a
plan would remove first).

    python benchmarks/sensitivity_rows.py --model smollm2-135m --data-dir ../shared/data \\
        --out benchmarks/results/sensitivity_rows.json

On CPU it is slow (hours at 128 x 2048 for SmolLM2); it was run on one H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import calibration_tokens
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions
from prunekit.score.sensitivity import sensitivity_scores

KINDS = ("kv_group", "head")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank_a, rank_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    return float((rank_a * rank_b).sum() / (rank_a.norm() * rank_b.norm()))


def lowest_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float) -> float:
    """Share of the `fraction` lowest-scoring entries of `b` that are also among the lowest of `a`."""
    k = max(1, int(round(fraction * len(a))))
    return len(set(a.argsort()[:k].tolist()) & set(b.argsort()[:k].tolist())) / k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=128, help="calibration rows (default 128)")
    parser.add_argument("--prefixes", default="8,16,32,64", help="row counts compared with all rows (default 8,16,32,64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="model dtype (float32: matmuls in TF32 on GPUs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--removals-per-pass", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        prefixes = [int(e) for e in args.prefixes.split(",")]
    except ValueError:
        parser.error(f"--prefixes takes row counts such as 8,16,32; got {args.prefixes!r}")
    if min(prefixes + [args.rows]) < 1:
        parser.error(f"--prefixes and --rows take counts of at least 1; got {args.prefixes!r} and {args.rows}")
    ends = [e for e in prefixes if e < args.rows] + [args.rows]

    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    model, tokenizer = prunekit.load(args.model, dtype=args.dtype)
    model.to(args.device)
    ids = calibration_tokens("c4", tokenizer, n_samples=args.rows, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    blocks, start = [], 0
    for end in ends:
        t0 = time.perf_counter()
        scores = sensitivity_scores(model, ids[start:end], kinds=KINDS, batch_size=args.batch_size,
                                    removals_per_pass=args.removals_per_pass, fine_tokens=0, progress=False)
        blocks.append({"rows": [start, end], "seconds": round(time.perf_counter() - t0, 1),
                       "values": {k: torch.cat([v.reshape(-1) for v in scores.values[k]]) for k in KINDS}})
        print(f"rows {start}-{end}: {blocks[-1]['seconds']} s", flush=True)
        start = end

    def prefix(end: int, kind: str) -> torch.Tensor:  # every row has seq_len tokens: weights are row counts
        used = [b for b in blocks if b["rows"][1] <= end]
        return sum(b["values"][kind] * (b["rows"][1] - b["rows"][0]) for b in used) / end

    comparison = {}
    for end in ends[:-1]:
        comparison[str(end)] = {
            kind: {"spearman": round(spearman(prefix(end, kind), prefix(args.rows, kind)), 4),
                   "lowest_35pct_overlap": round(lowest_overlap(prefix(end, kind), prefix(args.rows, kind), 0.35), 4)}
            for kind in KINDS}
        print(f"first {end:3d} rows ({end * args.seq_len:,} tokens) vs {args.rows}: {comparison[str(end)]}", flush=True)
    record = {
        "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "versions": versions(), "model": args.model, "dtype": args.dtype, "calibration": f"c4, {args.rows} x {args.seq_len}, seed 0",
        "kinds": list(KINDS), "blocks": [{k: v for k, v in b.items() if k != "values"} for b in blocks],
        "against_all_rows": comparison,
        "scores_all_rows": {kind: [round(float(x), 6) for x in prefix(args.rows, kind)] for kind in KINDS},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
