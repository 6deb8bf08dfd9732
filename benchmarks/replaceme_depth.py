"""Issue 19: ReplaceMe against a plain drop, for depth pruning of SmolLM2-135M.

Block influence (ShortGPT) picks the layers; each plan is cut as it is, or with every span of
dropped layers folded into the layer before it (`--replace-dropped-layers`). Calibration C4
128 x 512 (seed 0); WikiText-2 (`wiki.test.raw`, 512-token windows, every 16th, fp32).

    python benchmarks/replaceme_depth.py --ratios 0.1,0.2 --out benchmarks/results/replaceme_depth.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.compensate.replaceme import replace_dropped_layers
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.huggingface import versions
from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
from prunekit.score import score_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.1,0.2")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    ids = calibration_tokens("c4", tokenizer, n_samples=128, seq_len=512, seed=0, data_dir=args.data_dir)
    structure = prunekit.model_structure(dense)

    def wikitext(model) -> float:
        return round(perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                                window_every=args.eval_every, protocol="raw", data_dir=args.data_dir,
                                progress=False).perplexity, 3)

    scores = score_model(dense, "block_influence", ids, progress=False)
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "device": f"cpu x{torch.get_num_threads()}",
              "versions": versions(), "dense": wikitext(dense), "runs": []}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        plan = make_plan(structure, scores, PlannerSettings(target=ratio, prune=("layer",)), comparable=False)
        run = {"ratio": ratio, "drop_layers": list(plan.drop_layers)}
        for name in ("plain", "replaceme"):
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            if name == "replaceme":
                report = replace_dropped_layers(model, plan, ids, progress=False)
                run["fits"] = report.to_dict()["fits"]
            after = prunekit.apply_plan(model, plan)
            run[name] = {"seconds": round(time.perf_counter() - started, 1), "wikitext2": wikitext(model),
                         "removed": round(removed_fraction(structure, after, "non-embedding"), 5)}
            del model
        print(f"{ratio}: drop {run['drop_layers']}: plain {run['plain']['wikitext2']}  "
              f"replaceme {run['replaceme']['wikitext2']}", flush=True)
        record["runs"].append(run)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
