"""What the sensitivity analysis costs on this machine: SmolLM2-135M, every layer, attention and
MLP sublayer, KV group and head (15 removals per layer, 450 in all), on C4 calibration text.

The cost is linear in the calibration tokens (every removal runs the cached states of every
sequence through the rest of the model), so a run on fewer sequences gives the time for more:

    python benchmarks/sensitivity_cost.py --samples 4 --dtype bfloat16 --extrapolate-to 64
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

import prunekit
from prunekit.data import calibration_tokens
from prunekit.export.huggingface import versions
from prunekit.score.sensitivity import sensitivity_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--removals-per-pass", type=int, default=4)
    parser.add_argument("--extrapolate-to", type=int, default=64, help="report the time for this many sequences too")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, tokenizer = prunekit.load(args.model, dtype=args.dtype)
    ids = calibration_tokens("c4", tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    started = time.perf_counter()
    scores = sensitivity_scores(model, ids, kinds=("layer", "attention", "mlp", "kv_group", "head"),
                                batch_size=args.batch_size, removals_per_pass=args.removals_per_pass)
    seconds = time.perf_counter() - started
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(), "model": args.model, "dtype": args.dtype, "tokens": f"{args.samples} x {args.seq_len}",
        "seconds": round(seconds, 1), "cost": scores.meta["cost"],
        f"seconds_extrapolated_to_{args.extrapolate_to}x{args.seq_len}": round(seconds * args.extrapolate_to / args.samples, 0),
        "most_sensitive_layers": [int(i) for i in torch.argsort(scores.layer_values("layer"), descending=True)[:5]],
        "layer_loss_increase": [round(float(v), 4) for v in scores.layer_values("layer")],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
