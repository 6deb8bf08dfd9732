"""Issue-3 benchmark: prune SmolLM2-135M to several ratios with every criterion and allocation,
with and without compensation, and measure WikiText-2 perplexity.

Protocol (the peers were run on exactly this): calibrate on C4 (128 x 512 tokens, seed 0);
evaluate on `wiki.test.raw` read as it is, tokenized once without special tokens,
non-overlapping 512-token windows, remainder dropped, fp32; the grid on every 16th window
(37 windows; the dense model scores 29.45), the best setting per ratio also on every window.
Scores are computed once per criterion on the dense model and reused across ratios.

Issue 19 adds structured OBS (`--compensation obs`: re-pick which units each layer loses, keeping
the plan's widths, with the optimal update) and block reconstruction (`--reconstruct-steps`,
Adam toward the dense blocks on C4 calibration rows only; WikiText-2 is never seen before the
evaluation), and zero-shot tasks of every run (`--tasks`).

    python benchmarks/pruning_grid.py --out results/grid.json              # whole grid
    python benchmarks/pruning_grid.py --criteria taylor --ratios 0.2 ...   # a slice
    python benchmarks/pruning_grid.py --criteria taylor --allocations global --compensation sequential,obs \
        --structures "channel,head,kv_group;channel" --reconstruct-steps 0,200 --out results/grid_obs.json
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
from grid_table import repair_label

import prunekit
from prunekit.compensate import compensate, compensate_sequential
from prunekit.compensate.obs import DEFAULT_CHANNELS_PER_STEP, DEFAULT_DAMPING, select_and_update
from prunekit.compensate.reconstruct import DEFAULT_LR, reconstruct_blocks
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.tasks import evaluate_tasks
from prunekit.export.huggingface import versions
from prunekit.models.architecture import architecture_for
from prunekit.models.modeling_prunekit import decoder_layers
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


def parse_repair(option: str) -> dict:
    """COMPENSATION[:CHANNELS_PER_STEP][+STEPS[@LR]] as the settings of one run's repair."""
    compensation, _, reconstruction = option.partition("+")
    compensation, _, per_step = compensation.partition(":")
    steps, _, lr = reconstruction.partition("@")
    obs = compensation == "obs"
    return {"compensation": compensation,
            "channels_per_step": int(per_step or DEFAULT_CHANNELS_PER_STEP) if obs else None,
            "damping": DEFAULT_DAMPING if obs else None, "reconstruct_steps": int(steps or 0),
            "reconstruct_lr": float(lr or DEFAULT_LR) if steps else None}


def _accuracies(tasks: dict | None) -> str:
    return " ".join(f"{task}={m.get('acc_norm', m.get('acc')):.3f}" for task, m in (tasks or {}).items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--criteria", default=",".join(sorted(CRITERIA)))
    parser.add_argument("--allocations", default="uniform,global,adaptive")
    parser.add_argument("--compensation", default="none,one-shot,sequential",
                        help="comma list of none, one-shot, sequential, obs; or repairs COMPENSATION[:CHANNELS_PER_STEP]"
                             "[+STEPS[@LR]], e.g. obs:64 or obs+200@3e-5 (OBS removing 64 FFN channels per exact step; "
                             "OBS then 200 steps of block reconstruction at learning rate 3e-5)")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks of every run and of the dense model, e.g. "
                        "piqa,arc_easy,hellaswag")
    parser.add_argument("--task-limit", type=int, default=None, help="first N examples of each task")
    parser.add_argument("--structures", default=None,
                        help="override what may be removed, e.g. channel (FFN only); default channel,head,kv_group; "
                             "several sets separated by ';' are each a run")
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
    if args.tasks:
        record["dense_tasks"] = evaluate_tasks(dense, tokenizer, args.tasks.split(","), data_dir=args.data_dir,
                                               limit=args.task_limit, batch_size=32)
    print(f"dense: {record['dense']} {_accuracies(record.get('dense_tasks'))}", flush=True)
    t0 = time.perf_counter()
    stats = collect_layer_stats(dense, ids, batch_size=args.batch_size, with_gram=True, progress=False)
    stats_seconds = time.perf_counter() - t0
    print(f"set-up (load, calibration data, dense evaluation, statistics): {time.perf_counter() - started:.0f} s", flush=True)

    dense_layers = decoder_layers(dense, architecture_for(dense.config.model_type).to_dict())

    def apply_compensation(model, plan, mode: str, repair: dict) -> tuple:
        """Compensate (OBS re-picks the units and returns its revised plan), cut, reconstruct;
        (the plan that was cut, the structure after, what the repair reported)."""
        details: dict = {}
        t0 = time.perf_counter()
        if mode == "one-shot":
            compensate(model, plan, stats)
        elif mode == "sequential":
            compensate_sequential(model, plan, ids, batch_size=args.batch_size, progress=False)
        elif mode == "obs":
            revised, report = select_and_update(model, plan, ids, damping=repair["damping"], batch_size=args.batch_size,
                                                channels_per_step=repair["channels_per_step"], progress=False)
            details["obs"] = {"units_changed": sum(f.changed for f in report.fits),
                              "units_removed": sum(f.removed for f in report.fits),
                              "error_plan_refit": round(sum(f.error_plan_refit for f in report.fits), 4),
                              "error_obs": round(sum(f.error_obs for f in report.fits), 4)}
            plan = revised
        details["compensate_seconds"] = round(time.perf_counter() - t0, 1)
        after = prunekit.apply_plan(model, plan)
        if repair["reconstruct_steps"]:
            t0 = time.perf_counter()
            report = reconstruct_blocks(model, dense_layers, ids, steps=repair["reconstruct_steps"],
                                        lr=repair["reconstruct_lr"], batch_size=args.batch_size, progress=args.progress)
            details["reconstruct"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "steps_run": sum(layer.steps for layer in report.layers),
                "mean_error_before": round(sum(l.error_before for l in report.layers) / len(report.layers), 5),
                "mean_error_after": round(sum(l.error_after for l in report.layers) / len(report.layers), 5)}
        return plan, after, details

    ratios = [float(r) for r in args.ratios.split(",")]
    # How to rebuild each run (for --full-eval-best): plans stay in memory, the JSON keeps the widths.
    rebuilds: dict[int, object] = {}
    compensations = args.compensation.split(",")
    step_counts = [int(s) for s in args.steps.split(",")]
    repairs = [parse_repair(option) for option in compensations]
    structure_sets = [tuple(option.split(",")) for option in args.structures.split(";")] if args.structures else None
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
            for ratio, structures in [(r, s) for r in ratios for s in (structure_sets or [STRUCTURES[criterion]])]:
                settings = PlannerSettings(target=ratio, allocation=allocation, prune=structures)
                plan = make_plan(dense_structure, scores, settings, comparable=spec.comparable)
                for repair, steps in [(rp, k) for rp in repairs for k in step_counts]:
                    compensated = repair["compensation"]
                    if steps == 1:
                        def rebuild(plan=plan, repair=repair):
                            model = copy.deepcopy(dense)
                            cut, after, details = apply_compensation(model, plan, repair["compensation"], repair)
                            return model, after, [cut], details
                    elif repair["compensation"] == "obs" or repair["reconstruct_steps"]:
                        continue  # iterative pruning goes through the pipeline, which these runs do not use here
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
                            return model, prunekit.model_structure(model), plans, {}
                    t0 = time.perf_counter()
                    model, after, run_plans, details = rebuild()
                    prune_seconds = time.perf_counter() - t0
                    result = evaluate(model, args.eval_every)
                    if args.tasks:
                        result["tasks"] = evaluate_tasks(model, tokenizer, args.tasks.split(","), data_dir=args.data_dir,
                                                         limit=args.task_limit, batch_size=32)
                    run = {
                        "criterion": criterion, "allocation": allocation, "compensation": compensated, "target": ratio,
                        "steps": steps, "structures": list(structures),
                        "removed_non_embedding": round(removed_fraction(dense_structure, after, "non-embedding"), 4),
                        **result, "score_seconds": round(score_seconds, 1), "prune_seconds": round(prune_seconds, 1),
                        "peak_memory_mib": round(max(score_memory, peak_memory_mib(device)), 0),
                        "layers": after.num_layers, "kept": [[s.num_attention_heads, s.num_key_value_heads,
                                                              s.intermediate_size] for s in after.layers],
                        "dropped_layers": sorted({i for p in run_plans for i in p.drop_layers}),
                        **{k: v for k, v in repair.items() if k != "compensation" and v is not None}, **details,
                    }
                    record["runs"].append(run)
                    rebuilds[len(record["runs"]) - 1] = rebuild
                    print(f"{criterion:16s} {allocation:9s} {','.join(structures):22s} comp={repair_label(run):28s} "
                          f"steps={steps} r={ratio:.2f} removed={run['removed_non_embedding']:.3f} "
                          f"ppl={run['perplexity']:.2f} prune={prune_seconds:.0f}s {_accuracies(result.get('tasks'))}",
                          flush=True)
                    out.write_text(json.dumps(record, indent=1) + "\n")  # partial results survive a timeout
                    del model

    if args.full_eval_best:
        for ratio in ratios:
            index = min((i for i, r in enumerate(record["runs"]) if r["target"] == ratio),
                        key=lambda i: record["runs"][i]["perplexity"])
            best = record["runs"][index]
            model = rebuilds[index]()[0]
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
