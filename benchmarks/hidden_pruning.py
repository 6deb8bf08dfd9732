"""Issue 21: hidden-size pruning against FFN pruning and both, on SmolLM2-135M, training-free.

Targets are fractions of *total* parameters (the tied embedding counts). Criterion `activation`
(residual channels by the L2 norm of the input norms' outputs, Minitron; FFN channels by
Wanda-sp), global allocation, 64-wide moves for both. Each plan is cut plain, and with the
least-squares refits: sequential compensation of o/down for the FFN channels, and the refit of
the projections that read the residual stream (`refit_hidden_readers`) for hidden channels.
Calibration C4 128 x 512 (seed 0); WikiText-2 (`wiki.test.raw`, 512-token windows, every 16th,
fp32).

    python benchmarks/hidden_pruning.py --ratios 0.2,0.35 --out benchmarks/results/hidden_pruning_cpu.json
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
from prunekit.compensate.hidden import refit_hidden_readers
from prunekit.compensate.sequential import compensate_sequential
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.huggingface import versions
from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded
from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
from prunekit.score import score_model

STRUCTURES = {"hidden": ("hidden",), "ffn": ("channel",), "hidden+ffn": ("hidden", "channel")}
# FFN channels as `prunekit prune --basis total` prunes them by default (magnitude order, log_increase
# budgets, structured OBS): the strongest FFN-only baseline, one variant ("default").
DEFAULT_FFN = "ffn-default"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--multiple", type=int, default=64, help="hidden and FFN moves")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unknown = sorted(set(args.structures.split(",")) - set(STRUCTURES) - {DEFAULT_FFN})
    if unknown:
        parser.error(f"unknown structures {unknown}; choose from {sorted(STRUCTURES) + [DEFAULT_FFN]}")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios takes fractions such as 0.2,0.35, got {args.ratios!r}")
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    ids = calibration_tokens("c4", tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                             data_dir=args.data_dir)
    structure = prunekit.model_structure(dense)

    def wikitext(model) -> float:
        return round(perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                                window_every=args.eval_every, protocol="raw", data_dir=args.data_dir,
                                progress=False).perplexity, 3)

    started = time.perf_counter()
    scores = score_model(dense, "activation", ids, progress=False)
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "device": f"cpu x{torch.get_num_threads()}",
              "versions": versions(), "scoring_seconds": round(time.perf_counter() - started, 1),
              "dense": {"wikitext2": wikitext(dense), "params": structure.total_params}, "runs": []}
    for ratio in ratios:
        for name in args.structures.split(","):
            if name == DEFAULT_FFN:
                record["runs"].append(default_ffn_run(dense, tokenizer, ids, ratio, structure, wikitext))
                print(f"{ratio} {name}: {record['runs'][-1]['default']['wikitext2']}", flush=True)
                Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
                continue
            settings = PlannerSettings(target=ratio, basis="total", prune=STRUCTURES[name],
                                       ffn_multiple=args.multiple, hidden_multiple=args.multiple)
            plan = make_plan(structure, scores, settings, comparable=False)
            run = {"ratio": ratio, "structures": name,
                   "hidden": len(plan.keep_hidden) if plan.keep_hidden is not None else structure.hidden_size}
            for variant in ("plain", "refit"):
                model = copy.deepcopy(dense)
                began = time.perf_counter()
                if variant == "refit":
                    if plan.layers:
                        compensate_sequential(model, plan, ids, progress=False)
                    if plan.keep_hidden is not None:
                        refit_hidden_readers(model, plan, ids, progress=False)
                after = prunekit.apply_plan(model, plan)
                run[variant] = {"seconds": round(time.perf_counter() - began, 1), "wikitext2": wikitext(model),
                                "removed_total": round(removed_fraction(structure, after, "total"), 5),
                                "removed_non_embedding": round(removed_fraction(structure, after, "non-embedding"), 5),
                                "params": after.total_params}
                del model
            print(f"{ratio} {name}: hidden {run['hidden']}  plain {run['plain']['wikitext2']}  "
                  f"refit {run['refit']['wikitext2']}", flush=True)
            record["runs"].append(run)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def default_ffn_run(dense, tokenizer, ids, ratio: float, structure, wikitext) -> dict:
    model = copy.deepcopy(dense)
    began = time.perf_counter()
    settings = PruneSettings(target=ratio, basis="total",
                             calibration=CalibrationSettings(n_samples=ids.shape[0], seq_len=ids.shape[1]))
    prune_loaded(model, tokenizer, settings, progress=False, calibration=(ids, None))
    after = prunekit.model_structure(model)
    return {"ratio": ratio, "structures": DEFAULT_FFN, "hidden": structure.hidden_size,
            "settings": {k: getattr(settings, k) for k in ("criterion", "allocation", "prune", "compensation")},
            "default": {"seconds": round(time.perf_counter() - began, 1), "wikitext2": wikitext(model),
                        "removed_total": round(removed_fraction(structure, after, "total"), 5),
                        "removed_non_embedding": round(removed_fraction(structure, after, "non-embedding"), 5),
                        "params": after.total_params}}


if __name__ == "__main__":
    raise SystemExit(main())
