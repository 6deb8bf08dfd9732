"""Issue-3 benchmark: prune SmolLM2-135M to several ratios with every criterion and allocation,
with and without compensation, and measure WikiText-2 perplexity.

Protocol (the peers were run on exactly this): calibrate on C4 (128 x 512 tokens, seed 0);
evaluate on `wiki.test.raw` read as it is, tokenized once without special tokens,
non-overlapping 512-token windows, remainder dropped, fp32; the grid on every 16th window
(37 windows; the dense model scores 29.45), the best setting per ratio also on every window.
Scores are computed once per criterion on the dense model and reused across ratios.

    python benchmarks/pruning_grid.py --out results/grid.json              # whole grid
    python benchmarks/pruning_grid.py --criteria taylor --ratios 0.2 ...   # a slice
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.compensate import compensate, compensate_sequential
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.huggingface import versions
from prunekit.pipeline import PruneSettings, prune_loaded
from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
from prunekit.score import CRITERIA, collect_layer_stats, score_model

# What each criterion may remove: block influence scores layers and sublayers only (ShortGPT).
STRUCTURES = {name: ("channel", "head", "kv_group") for name in CRITERIA}
STRUCTURES["block_influence"] = ("layer",)
CRITERION_OPTIONS = {"sensitivity": {"kinds": ("layer", "attention", "mlp", "kv_group", "head", "channel"),
                                     "channel_group_size": 64, "removals_per_pass": 16}}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--criteria", default=",".join(sorted(CRITERIA)))
    parser.add_argument("--allocations", default="uniform,global,adaptive")
    parser.add_argument("--compensation", default="none,one-shot,sequential",
                        help="comma list of none, one-shot, sequential")
    parser.add_argument("--structures", default=None,
                        help="override what may be removed, e.g. channel (FFN only); default channel,head,kv_group")
    parser.add_argument("--steps", default="1",
                        help="comma list of iterative step counts; runs with more than one step go through "
                             "prunekit.pipeline.prune_loaded, scoring again between steps")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--full-eval-best", action="store_true", help="evaluate the best run of each ratio on every window")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/pruning_grid.json")
    parser.add_argument("--tf32-scoring", action="store_true",
                        help="allow TF32 matmuls while scoring on CUDA (evaluation always runs in full fp32)")
    parser.add_argument("--progress", action="store_true", help="progress bars for scoring and compensation (stderr)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    device = torch.device(args.device)
    started = time.perf_counter()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    dense.to(device)
    ids = calibration_tokens("c4", tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                             data_dir=args.data_dir)

    def evaluate(model, every: int) -> dict:
        result = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512, window_every=every,
                            protocol="raw", batch_size=args.batch_size, data_dir=args.data_dir, progress=False)
        return {"perplexity": round(result.perplexity, 3), "windows": result.n_windows}

    dense_structure = prunekit.model_structure(dense)
    record = {
        "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "machine": platform.processor() or
        platform.machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "versions": versions(), "protocol": {"calibration": f"c4 {args.calib_samples}x{args.calib_seq_len} seed 0",
                                             "eval": f"wikitext2 raw test, 512-token windows, every {args.eval_every}th, fp32"},
        "dense": evaluate(dense, args.eval_every), "runs": [],
    }
    print(f"dense: {record['dense']}", flush=True)
    t0 = time.perf_counter()
    stats = collect_layer_stats(dense, ids, batch_size=args.batch_size, with_gram=True, progress=False)
    stats_seconds = time.perf_counter() - t0
    print(f"set-up (load, calibration data, dense evaluation, statistics): {time.perf_counter() - started:.0f} s", flush=True)

    def apply_compensation(model, plan, mode: str) -> None:
        if mode == "one-shot":
            compensate(model, plan, stats)
        elif mode == "sequential":
            compensate_sequential(model, plan, ids, batch_size=args.batch_size, progress=False)

    ratios = [float(r) for r in args.ratios.split(",")]
    # How to rebuild each run (for --full-eval-best): plans stay in memory, the JSON keeps the widths.
    rebuilds: dict[int, object] = {}
    compensations = args.compensation.split(",")
    step_counts = [int(s) for s in args.steps.split(",")]
    for criterion in args.criteria.split(","):
        spec = CRITERIA[criterion]
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32_scoring
        scores = score_model(dense, criterion, ids, stats=stats, batch_size=args.batch_size, progress=args.progress,
                             **CRITERION_OPTIONS.get(criterion, {}))
        torch.backends.cuda.matmul.allow_tf32 = False
        score_seconds = time.perf_counter() - t0 + (stats_seconds if spec.needs_stats else 0)
        score_memory = peak_memory_mib(device)
        allocations = ["global"] if criterion == "block_influence" else args.allocations.split(",")
        for allocation in allocations:
            for ratio in ratios:
                structures = tuple(args.structures.split(",")) if args.structures else STRUCTURES[criterion]
                settings = PlannerSettings(target=ratio, allocation=allocation, prune=structures)
                plan = make_plan(dense_structure, scores, settings, comparable=spec.comparable)
                for compensated, steps in [(c, k) for c in compensations for k in step_counts]:
                    if steps == 1:
                        def rebuild(plan=plan, compensated=compensated):
                            model = copy.deepcopy(dense)
                            apply_compensation(model, plan, compensated)
                            return model, prunekit.apply_plan(model, plan), [plan]
                    else:
                        def rebuild(criterion=criterion, allocation=allocation, ratio=ratio, structures=structures,
                                    compensated=compensated, steps=steps):
                            model = copy.deepcopy(dense)
                            pipeline = PruneSettings(target=ratio, criterion=criterion, allocation=allocation,
                                                     prune=structures, compensation=compensated, steps=steps,
                                                     batch_size=args.batch_size,
                                                     criterion_options=CRITERION_OPTIONS.get(criterion, {}))
                            record = prune_loaded(model, tokenizer, pipeline, progress=False, calibration=(ids, None))
                            plans = [prunekit.Plan.from_dict(s["plan"]) for s in record["steps"]]
                            return model, prunekit.model_structure(model), plans
                    t0 = time.perf_counter()
                    model, after, run_plans = rebuild()
                    prune_seconds = time.perf_counter() - t0
                    result = evaluate(model, args.eval_every)
                    run = {
                        "criterion": criterion, "allocation": allocation, "compensation": compensated, "target": ratio,
                        "steps": steps, "structures": list(structures),
                        "removed_non_embedding": round(removed_fraction(dense_structure, after, "non-embedding"), 4),
                        **result, "score_seconds": round(score_seconds, 1), "prune_seconds": round(prune_seconds, 1),
                        "peak_memory_mib": round(max(score_memory, peak_memory_mib(device)), 0),
                        "layers": after.num_layers, "kept": [[s.num_attention_heads, s.num_key_value_heads,
                                                              s.intermediate_size] for s in after.layers],
                        "dropped_layers": sorted({i for p in run_plans for i in p.drop_layers}),
                    }
                    record["runs"].append(run)
                    rebuilds[len(record["runs"]) - 1] = rebuild
                    print(f"{criterion:16s} {allocation:9s} {','.join(structures):22s} comp={compensated:10s} "
                          f"steps={steps} r={ratio:.2f} removed={run['removed_non_embedding']:.3f} "
                          f"ppl={run['perplexity']:.2f}", flush=True)
                    out.write_text(json.dumps(record, indent=1) + "\n")  # partial results survive a timeout
                    del model

    if args.full_eval_best:
        for ratio in ratios:
            index = min((i for i, r in enumerate(record["runs"]) if r["target"] == ratio),
                        key=lambda i: record["runs"][i]["perplexity"])
            best = record["runs"][index]
            model, _, _ = rebuilds[index]()
            best["full_eval"] = evaluate(model, 1)
            print(f"best at {ratio}: {best['criterion']} {best['allocation']} comp={best['compensation']} "
                  f"every window: {best['full_eval']}", flush=True)
        record["dense_full_eval"] = evaluate(dense, 1)
    record["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
