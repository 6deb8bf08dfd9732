"""Issue 27: the prune step of the shipped recipes (slimllm, adapt-pruner, llm-pruner) beside
prunekit's default, training-free, at several fractions of the non-embedding parameters, with
WikiText-2 perplexity and zero-shot accuracy.

Each recipe's `prune:` section is read from its YAML (recipes/NAME.yaml, as `prunekit run NAME`
reads it) and run through prunekit.pipeline.prune_loaded, the function the recipe's prune stage
runs; only the target, the device and the batch size change. `default` is `prunekit prune
--target T` with nothing else (PruneSettings()). What this leaves out of a recipe is recorded per
run (`not_run`): its recover stage, and Adapt-Pruner's `schedule` (its interleaved prune and
recover rounds), so adapt-pruner's rows are its allocation and criterion pruned in one shot.
Each recipe scores the dense model once; every target is planned from those scores.
Protocol as benchmarks/pruning_grid.py: C4 calibration (each recipe's own, all C4 128 x 512, seed
0); WikiText-2 `wiki.test.raw`, 512-token windows, every 16th, fp32; tasks through prunekit's
lm-eval (`--task-limit N`: first N examples). The record is rewritten after every model, so a
killed run keeps what it had, and `--resume` runs only the models it lacks.

    python benchmarks/recipes_grid.py --data-dir ../shared/data --tasks piqa,arc_easy,hellaswag --task-limit 500 \
        --out benchmarks/results/recipes_grid.json
    python benchmarks/recipes_grid.py --recipes llm-pruner --ratios 0.2 --data-dir ../shared/data --out r.json
    python benchmarks/recipes_grid.py --markdown benchmarks/results/recipes_grid_gpu.json   # BENCHMARKS.md table
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

RECIPES = ("slimllm", "adapt-pruner", "llm-pruner")
DEFAULT = "default"  # prunekit prune --target T, nothing else
TASK_METRIC = "acc_norm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default=",".join(RECIPES + (DEFAULT,)),
                        help=f"shipped recipes whose prune step runs, and `{DEFAULT}` (prunekit's default prune), "
                             "in this order")
    parser.add_argument("--ratios", default="0.2,0.35,0.5", help="fractions of the non-embedding parameters removed")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks of every model, e.g. piqa,arc_easy,hellaswag")
    parser.add_argument("--task-limit", type=int, default=None, help="first N examples of each task")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=512, help="WikiText-2 window length")
    parser.add_argument("--eval-every", type=int, default=16, help="WikiText-2: every n-th window")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="override every recipe's calibration rows (a smoke test; the recipes say 128)")
    parser.add_argument("--calib-seq-len", type=int, default=None,
                        help="override every recipe's calibration row length (a smoke test; the recipes say 512)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recipes_grid.json"))
    parser.add_argument("--resume", action="store_true", help="keep the models --out already holds (same protocol) "
                        "and run only the missing ones: the same command again after a timeout finishes the grid")
    parser.add_argument("--markdown", type=Path, metavar="RECORD", help="print BENCHMARKS.md's table of RECORD, "
                        "with docs-check references, and run nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        return args
    args.recipes = [r for r in args.recipes.split(",") if r]
    from prunekit.runner import shipped_recipes

    unknown = [r for r in args.recipes if r != DEFAULT and r not in shipped_recipes()]
    if not args.recipes or unknown:
        parser.error(f"--recipes takes shipped recipes ({', '.join(shipped_recipes())}) or {DEFAULT}; "
                     f"got {', '.join(unknown) or 'none'}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r]
    except ValueError:
        parser.error(f"--ratios takes fractions such as 0.2,0.35,0.5; got {args.ratios!r}")
    if not args.ratios or not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios are fractions in (0, 1); got {args.ratios}")
    if args.task_limit is not None and not args.tasks:
        parser.error("--task-limit limits --tasks; name the tasks too")
    return args


def prune_settings(name: str, args: argparse.Namespace):
    """The recipe's prune settings (or the default's) as this run uses them, and what of the recipe
    does not run here."""
    from prunekit.pipeline import PruneSettings
    from prunekit.runner import load_recipe

    if name == DEFAULT:
        settings, not_run = PruneSettings(), []
    else:
        recipe = load_recipe(name)
        settings = recipe.prune
        not_run = [stage for stage in recipe.stages if stage in ("analyze", "plan", "recover", "bench", "export")]
        if recipe.schedule is not None:
            not_run.append(f"schedule {json.dumps(dataclasses.asdict(recipe.schedule))} (pruned in one shot instead)")
    calibration = dataclasses.replace(
        settings.calibration, data_dir=args.data_dir,
        n_samples=args.calib_samples or settings.calibration.n_samples,
        seq_len=args.calib_seq_len or settings.calibration.seq_len)
    settings = dataclasses.replace(settings, device=args.device, batch_size=args.batch_size, calibration=calibration)
    settings.validate()
    return settings, not_run


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text()), args.markdown.name))
        return 0
    import prunekit
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.evaluate.tasks import evaluate_tasks
    from prunekit.export.files import atomic_write_text
    from prunekit.export.huggingface import versions
    from prunekit.pipeline import calibration_batch, prune_loaded, score_loaded

    plans = {name: prune_settings(name, args) for name in args.recipes}  # every recipe checked before any load
    device = torch.device(args.device)
    started = time.perf_counter()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    dense.to(device)
    tasks = args.tasks.split(",") if args.tasks else []

    def evaluate(model) -> dict:
        result = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=args.eval_seq_len,
                            window_every=args.eval_every, protocol="raw", batch_size=args.batch_size,
                            data_dir=args.data_dir, progress=False)
        measured = {"perplexity": round(result.perplexity, 3), "windows": result.n_windows}
        if tasks:
            measured["tasks"] = evaluate_tasks(model, tokenizer, tasks, data_dir=args.data_dir, limit=args.task_limit,
                                               batch_size=32)
        return measured

    protocol = {"eval": f"wikitext2 raw test, {args.eval_seq_len}-token windows, every {args.eval_every}th, fp32",
                "tasks": f"{','.join(tasks)}, first {args.task_limit} examples, 0-shot" if tasks else None,
                "calibration": "each recipe's own (prune.calibration), seed as the recipe says"}
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    if previous is not None and (previous.get("protocol") != protocol or previous.get("model") != args.model):
        raise SystemExit(f"--resume: {args.out} was made with another model or protocol ({previous.get('model')}, "
                         f"{previous.get('protocol')}); pass another --out or drop --resume")
    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else
        " ".join(["benchmarks/recipes_grid.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "versions": versions(), "model": args.model,
        "protocol": protocol,
    }
    if previous is not None:  # its dense figures and finished models stay as they were measured
        record.update(dense=previous["dense"], runs=previous["runs"],
                      resumed=previous.get("resumed", []) + [{"command": previous["command"], "date": previous["date"],
                                                              "runs": len(previous["runs"])}])
    else:
        record.update(dense=evaluate(dense), runs=[])
    done = {(run["recipe"], run["target"]) for run in record["runs"]}
    print(f"dense: {summary(record['dense'])}", flush=True)
    calibrations: dict = {}
    for name, (settings, not_run) in plans.items():
        ratios = [ratio for ratio in args.ratios if (name, ratio) not in done]
        if not ratios:
            continue
        key = dataclasses.astuple(settings.calibration)
        if key not in calibrations:  # the recipes calibrate alike: one draw of rows serves them all
            calibrations[key] = calibration_batch(dense, tokenizer, settings.calibration)
        ids, labels = calibrations[key]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        scores, _ = score_loaded(dense, ids, labels, settings, progress=False)
        score_seconds = time.perf_counter() - t0
        for ratio in ratios:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            pruned = prune_loaded(model, tokenizer, dataclasses.replace(settings, target=ratio), progress=False,
                                  calibration=(ids, labels), scores=scores)
            prune_seconds = time.perf_counter() - t0
            after = prunekit.model_structure(model)
            run = {
                "recipe": name, "target": ratio, "settings": {k: v for k, v in pruned["settings"].items()
                                                              if k not in ("device", "batch_size")},
                "not_run": not_run, "removed_non_embedding": pruned["removed"]["non-embedding"], **evaluate(model),
                "score_seconds": round(score_seconds, 1), "prune_seconds": round(prune_seconds, 1),
                "peak_memory_mib": round(peak_memory_mib(device)),
                "kept": [[s.num_attention_heads, s.num_key_value_heads, s.intermediate_size] for s in after.layers],
            }
            record["runs"].append(run)
            record["seconds"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")  # a killed run keeps what it had
            print(f"{name:13s} r={ratio:.2f} removed={run['removed_non_embedding']:.3f} {summary(run)} "
                  f"score={score_seconds:.1f}s prune={prune_seconds:.1f}s", flush=True)
            del model
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


def summary(measured: dict) -> str:
    accuracies = " ".join(f"{task}={m.get(TASK_METRIC, m.get('acc')):.3f}" for task, m in measured.get("tasks", {}).items())
    return f"ppl={measured['perplexity']:.2f} {accuracies}".strip()


def markdown(record: dict, name: str) -> str:
    """BENCHMARKS.md's table of a record: a row per model, every figure with its docs-check reference."""
    tasks = list(record["dense"].get("tasks", {}))
    header = ["recipe (prune step only)", "removed", "WikiText-2", *(f"{t} {TASK_METRIC}" for t in tasks)]
    header += ["mean"] if len(tasks) > 1 else []
    header += ["scoring + prune time"]
    lines = [f"<!-- record: {name} -->", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(prefix: str, measured: dict) -> tuple[list[str], list[str]]:
        printed, refs = [f"{measured['perplexity']:.2f}"], [f"{measured['perplexity']:.2f}@{prefix}/perplexity"]
        values = []
        for task in tasks:
            value = measured["tasks"][task][TASK_METRIC]
            values.append(value)
            printed.append(f"{value:.3f}")
            refs.append(f"{value:.3f}@{prefix}/tasks/{task}/{TASK_METRIC}")
        if len(tasks) > 1:
            mean = sum(values) / len(values)
            printed.append(f"{mean:.3f}")
            refs.append(f"{mean:.3f}@mean(" + ", ".join(f"{{{prefix}/tasks/{t}/{TASK_METRIC}}}" for t in tasks) + ")")
        return printed, refs

    printed, refs = cells("dense", record["dense"])
    lines.append("| dense | - | " + " | ".join(printed) + " | - | <!-- fig " + "; ".join(refs) + " -->")
    order = {r: i for i, r in enumerate(dict.fromkeys(run["recipe"] for run in record["runs"]))}
    indexed = sorted(enumerate(record["runs"]), key=lambda item: (item[1]["target"], order[item[1]["recipe"]]))
    for index, run in indexed:
        prefix = f"runs/{index}"
        removed = 100 * run["removed_non_embedding"]
        printed, refs = cells(prefix, run)
        score, prune = run["score_seconds"], run["prune_seconds"]
        label = "prunekit's default" if run["recipe"] == DEFAULT else run["recipe"]
        lines.append(f"| {label} | {removed:.1f}% | " + " | ".join(printed) + f" | {score:.1f} + {prune:.1f} s | "
                     "<!-- fig " + "; ".join([f"{removed:.1f}@100*{{{prefix}/removed_non_embedding}}", *refs,
                                             f"{score:.1f}@{prefix}/score_seconds",
                                             f"{prune:.1f}@{prefix}/prune_seconds"]) + " -->")
    lines += ["", f"`{record['command']}` on {record['device']}, {record['date']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
