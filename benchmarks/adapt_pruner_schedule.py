"""Issue-27 benchmark: Adapt-Pruner's interleaved prune/recover schedule against one-shot pruning
followed by the same number of recovery tokens, on SmolLM2-135M at 20% of non-embedding parameters.

Both arms run through `prunekit.run` (so the schedule measured is the runner's), with the prune
settings of recipes/adapt-pruner.yaml (Taylor within layers, per-layer ratios from each layer's
cos(input, output), no compensation) and distillation from the original:
- interleaved: `schedule: {rounds: R}`, recover.tokens T: round k prunes the model round k-1 recovered to
  k/R of the target (of the ORIGINAL model), then distils it on T/R tokens;
- one-shot: the same prune to the target at once (one step), then distillation on T tokens;
- stepwise (a control, only with --arms): the target in R steps, scoring again between them but
  with no training in between, then distillation on T tokens: it separates the gain of scoring a
  less pruned model again from the gain of training in between.
Calibration and training rows come from the first 800 documents of the local C4 shard; the C4
held-out perplexity is measured on rows of the other 200, which neither arm trains or scores on.
WikiText-2: wiki.test.raw read as it is, 512-token windows, every 16th, fp32 (ENVIRONMENT.md).
Each arm runs in its own folder under --work: running the command again after a kill resumes it.

    python benchmarks/adapt_pruner_schedule.py --data-dir ../shared/data --out benchmarks/results/adapt_pruner_schedule_cpu.json
    python benchmarks/adapt_pruner_schedule.py --markdown-only --out benchmarks/results/adapt_pruner_schedule_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ARMS = ("interleaved", "one-shot")
CONTROLS = ("stepwise",)
TRAIN_DOCUMENTS = 800  # of the 1,000 in the local C4 shard; the rest are held out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.2, help="fraction of non-embedding parameters removed")
    parser.add_argument("--rounds", type=int, default=4, help="prune/recover rounds of the interleaved arm")
    parser.add_argument("--tokens", type=int, default=65_536, help="recovery tokens of each arm (interleaved: all "
                        "rounds together)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration rows of each prune")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and training row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="recovery training precision")
    parser.add_argument("--ffn-multiple", type=int, default=64)
    parser.add_argument("--c4-rows", type=int, default=32, help="held-out C4 rows evaluated")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=16, help="WikiText-2: every n-th window")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--device", default="cpu", help="where pruning, recovery and evaluation run (cpu, cuda)")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR"))
    parser.add_argument("--work", type=Path, default=Path("runs/adapt_pruner_schedule"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapt_pruner_schedule_cpu.json"))
    parser.add_argument("--markdown-only", action="store_true", help="print the BENCHMARKS.md table of the record")
    args = parser.parse_args(argv)
    if args.markdown_only:
        return args
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS + CONTROLS):
        parser.error(f"--arms takes some of {','.join(ARMS + CONTROLS)}, got {args.arms!r}")
    if not 0 < args.target < 1:
        parser.error(f"--target is a fraction in (0, 1), got {args.target}")
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 to interleave anything, got {args.rounds}")
    step = args.batch_size * args.seq_len
    if args.tokens < args.rounds * step:
        parser.error(f"--tokens {args.tokens:,} leaves a round less than one optimizer step ({step:,} tokens); "
                     f"pass at least {args.rounds * step:,}")
    if args.data_dir is None or not (Path(args.data_dir) / "c4").is_dir() \
            or not (Path(args.data_dir) / "wikitext-2-raw").is_dir():
        parser.error("--data-dir (or PRUNEKIT_DATA_DIR) must name the shared data folder with c4/ and wikitext-2-raw/")
    args.arms = arms
    return args


def split_c4(data_dir: str, work: Path) -> tuple[Path, Path]:
    """The local C4 shard as two .jsonl files: the first TRAIN_DOCUMENTS documents (calibration and
    training) and the rest (held out)."""
    source = Path(data_dir) / "c4" / "c4_en_train_shard00000_first1000.jsonl"
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held_out = work / "c4_train.jsonl", work / "c4_held_out.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    for path, part in ((train, lines[:TRAIN_DOCUMENTS]), (held_out, lines[TRAIN_DOCUMENTS:])):
        text = "\n".join(part) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return train, held_out


def recipe(args: argparse.Namespace, arm: str, train: Path) -> dict:
    """The recipe of one arm: recipes/adapt-pruner.yaml's prune, distillation from the original."""
    # recovery trains where accelerate puts it (the GPU when there is one): a recipe's recover has no device key
    recover = {"method": "distill", "tokens": args.tokens, "batch_size": args.batch_size, "eval_every": 0,
               "checkpoint_every": 0,
               "precision": args.precision, "data": {"source": str(train), "seq_len": args.seq_len, "held_out": 4}}
    data = {
        "model": args.model, "stages": ["prune", "recover"], "data_dir": args.data_dir,
        "prune": {"target": args.target, "criterion": "adapt_pruner", "allocation": "adapt_pruner",
                  "prune": ["channel", "head", "kv_group"], "compensation": "none", "ffn_multiple": args.ffn_multiple,
                  "device": args.device,
                  "calibration": {"source": str(train), "n_samples": args.calib_samples, "seq_len": args.seq_len}},
        "recover": recover,
    }
    if arm == "interleaved":  # the only difference between the arms
        data["schedule"] = {"rounds": args.rounds}
    elif arm == "stepwise":
        data["prune"]["steps"] = args.rounds
    return data


def evaluate(model_spec: str | Path, c4_ids: torch.Tensor, args: argparse.Namespace) -> dict:
    import prunekit
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.recover.train import held_out_perplexity

    model, tokenizer = prunekit.load(model_spec, dtype="float32")
    model.to(args.device)
    started = time.perf_counter()
    wiki = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=args.eval_seq_len,
                      window_every=args.eval_every, protocol="raw", batch_size=4, data_dir=args.data_dir,
                      progress=False)
    with torch.no_grad():
        c4 = held_out_perplexity(model, c4_ids, c4_ids.clone(), 4, torch.device(args.device))
    structure = prunekit.model_structure(model)
    return {"wikitext2": round(wiki.perplexity, 3), "c4_held_out": round(c4, 3),
            "params": structure.total_params, "non_embedding_params": structure.non_embedding_params,
            "eval_seconds": round(time.perf_counter() - started, 1)}


def arm_summary(records: dict) -> dict:
    prune = [r for name, r in records.items() if name.partition("@")[0] == "prune"]
    recover = [r for name, r in records.items() if name.partition("@")[0] == "recover"]
    last_prune = prune[-1]["figures"]
    return {
        "prune_seconds": round(sum(r["seconds"] for r in prune), 1),
        "recover_seconds": round(sum(r["seconds"] for r in recover), 1),
        "removed_non_embedding": last_prune["removed"]["non-embedding"],
        "recovery_tokens": sum(r["figures"]["tokens"] for r in recover),
        "tokens_per_second": [r["figures"]["tokens_per_second"] for r in recover],
        "rounds": [{"stage": name, "seconds": r["seconds"], **{k: v for k, v in r["figures"].items()
                                                               if k in ("cumulative_target", "target", "tokens")},
                    **({"removed_non_embedding": r["figures"]["removed"]["non-embedding"]} if "removed" in r["figures"]
                       else {}),
                    **({"held_out_c4_train_rows": r["figures"]["held_out_perplexity"]}
                       if "held_out_perplexity" in r["figures"] else {})}
                   for name, r in records.items()],
    }


def markdown(record: dict) -> str:
    dense = record["dense"]
    lines = [f"Dense: WikiText-2 {dense['wikitext2']:.2f}, C4 held-out {dense['c4_held_out']:.2f}. "
             f"{record['tokens']:,} recovery tokens per arm, {record['target']:.0%} of non-embedding parameters.", "",
             "| arm | removed | WikiText-2 | C4 held-out | prune time | recovery time |", "|---|---|---|---|---|---|"]
    for arm, result in record["arms"].items():
        lines.append(f"| {arm} | {result['removed_non_embedding']:.1%} | {result['final']['wikitext2']:.2f} | "
                     f"{result['final']['c4_held_out']:.2f} | {result['prune_seconds'] / 60:.1f} min | "
                     f"{result['recover_seconds'] / 60:.1f} min |")
    if "pruned" in record.get("arms", {}).get("one-shot", {}):
        pruned = record["arms"]["one-shot"]["pruned"]
        lines += ["", f"One-shot before recovery: WikiText-2 {pruned['wikitext2']:.2f}, C4 held-out "
                      f"{pruned['c4_held_out']:.2f}."]
    lines += ["", f"`{record['command']}` on {record['machine']}, {record['date']}, {record['seconds'] / 60:.0f} min."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    import prunekit
    from prunekit.data import calibration_tokens
    from prunekit.export.files import atomic_write_text
    from prunekit.export.huggingface import versions

    started = time.perf_counter()
    train, held_out = split_c4(args.data_dir, args.work)
    recipes = {arm: recipe(args, arm, train) for arm in args.arms}
    for arm, data in recipes.items():  # every arm's every stage, before anything loads
        prunekit.run(data, args.work / arm, dry_run=True, progress_print=lambda *_: None)
    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads",
        "versions": versions(), "model": args.model, "target": args.target, "tokens": args.tokens,
        "rounds": args.rounds,
        "protocol": {
            "prune": f"criterion adapt_pruner, allocation adapt_pruner, no compensation, ffn_multiple "
                     f"{args.ffn_multiple}, calibration {args.calib_samples} x {args.seq_len} from the first "
                     f"{TRAIN_DOCUMENTS} C4 documents",
            "recover": f"distill from the original, default lr, batch {args.batch_size} x {args.seq_len}, "
                       f"{args.precision}, rows from the first {TRAIN_DOCUMENTS} C4 documents (interleaved: seed k-1 "
                       "in round k)",
            "wikitext2": f"wiki.test.raw as it is, {args.eval_seq_len}-token windows, every {args.eval_every}th, fp32",
            "c4_held_out": f"{args.c4_rows} rows x {args.eval_seq_len} from the last "
                           f"{1000 - TRAIN_DOCUMENTS} C4 documents, seed 0, fp32",
        },
        "recipes": recipes, "arms": {},
    }
    for arm, data in recipes.items():
        print(f"== {arm}", flush=True)
        records = prunekit.run(data, args.work / arm)
        record["arms"][arm] = arm_summary(records)
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    c4_ids = calibration_tokens(str(held_out), tokenizer, n_samples=args.c4_rows, seq_len=args.eval_seq_len, seed=0)
    del dense
    record["dense"] = evaluate(args.model, c4_ids, args)
    for arm in recipes:
        record["arms"][arm]["final"] = evaluate(args.work / arm / "recovered", c4_ids, args)
        print(arm, record["arms"][arm]["final"], flush=True)
    if "one-shot" in recipes:
        record["arms"]["one-shot"]["pruned"] = evaluate(args.work / "one-shot" / "model", c4_ids, args)
    record["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
