"""Issue-5 benchmark: recover a pruned SmolLM2-135M with each method on the same C4 token budget,
and time our training loop against Hugging Face Trainer + PEFT on the same LoRA job.

The pruned model is what `prunekit prune smollm2-135m --target 0.35 --out runs/pruned35` writes
(Taylor, global allocation, sequential compensation: the best setting of the pruning grid at 35%
in one step). Each method trains a fresh copy through the public API (`recover_loaded`) on C4
rows drawn with seed 0 (the same rows for every method); WikiText-2 perplexity is measured on
`wiki.test.raw` in 512-token windows (every --eval-every-th window, fp32) for the dense model,
the pruned model and each recovered model in the same process, and each method's share of the
gap closed is (pruned - recovered) / (pruned - dense).

The loop comparison trains the same LoRA (rank, alpha, targets, learning rate, schedule, batch)
on the same rows with both trainers, alternating them --speed-repeats times in one process, and
reports the median tokens/s of each.

    python benchmarks/recovery.py --pruned runs/pruned35 --out benchmarks/results/recovery.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions
from prunekit.recover import RecoveryData, RecoveryError, RecoverySettings, recover_loaded, recovery_rows
from prunekit.recover.train import _with_lora


def wikitext_ppl(model, tokenizer, every: int, data_dir: str | None) -> float:
    result = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512, window_every=every,
                        protocol="raw", batch_size=4, data_dir=data_dir, progress=False)
    return round(result.perplexity, 3)


def hf_trainer_seconds(model, ids: torch.Tensor, settings: RecoverySettings, steps: int) -> float:
    """Seconds of `steps` optimizer steps of transformers' Trainer on the same LoRA job: the
    train_runtime it reports (its loop, data loading included; its set-up excluded)."""
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    peft_model = _with_lora(model, settings)
    args = TrainingArguments(
        output_dir="/tmp/prunekit-hf-trainer", per_device_train_batch_size=settings.batch_size, max_steps=steps,
        learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=int(settings.warmup * steps),
        max_grad_norm=settings.clip, weight_decay=settings.weight_decay, logging_strategy="no", save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        seed=settings.seed,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=Rows())
    return trainer.train().metrics["train_runtime"]


def split_variants(text: str) -> list[str]:
    """'lora,distill:lr=2e-4,temperature=2' -> ['lora', 'distill:lr=2e-4,temperature=2']: a comma
    starts a new variant unless what follows is another KEY=VALUE (method names hold no '=');
    ';' always separates variants."""
    variants: list[str] = []
    for group in text.split(";"):
        for position, item in enumerate(filter(None, group.split(","))):
            if position and "=" in item and ":" not in item:
                variants[-1] += "," + item
            else:
                variants.append(item)
    return variants


def parse_variant(variant: str) -> tuple[str, dict]:
    """'distill:lr=2e-4,temperature=2' -> ('distill', {'lr': 0.0002, 'temperature': 2.0}); each value
    takes the type of the RecoverySettings field it sets."""
    method, _, rest = variant.partition(":")
    fields = {f.name: f for f in dataclasses.fields(RecoverySettings) if f.name not in ("method", "tokens", "data")}
    options = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if key not in fields or not equals:
            raise SystemExit(f"variant {variant!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(fields)}")
        default = fields[key].default
        kind = float if default is None else type(default)
        if kind not in (int, float, str):
            raise SystemExit(f"variant {variant!r}: {key} cannot be set from the command line")
        try:
            options[key] = kind(value)
        except ValueError:
            raise SystemExit(f"variant {variant!r}: {key} takes a {kind.__name__}, got {value!r}") from None
    return method, options


def markdown(record: dict) -> str:
    gap = record["pruned_ppl"] - record["dense_ppl"]
    lines = [f"Dense {record['dense_ppl']:.2f}, pruned {record['pruned_ppl']:.2f} (gap {gap:.2f}); "
             f"{record['tokens']:,}-token budget of C4; {record['protocol']['eval']}.", "",
             "| method | trains | peak lr | steps x tokens | WikiText-2 ppl | gap closed | held-out C4 ppl (start -> end) "
             "| training tokens/s | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, m in record["methods"].items():
        held = m["held_out_c4_ppl"]
        lines.append(f"| {method} | {m['trainable_params'] / 1e6:.1f}M params | {m['lr']:g} | {m['steps']} x "
                     f"{m['tokens'] // m['steps']:,} | {m['wikitext2_ppl']:.2f} | {m['gap_closed']:.0%} | "
                     f"{held[0][1]:.1f} -> {held[-1][1]:.1f} | {m['train_tokens_per_second']:.0f} | "
                     f"{m['wall_seconds'] / 60:.1f} min |")
    if "loop_speed" in record:
        speed = record["loop_speed"]
        lines += ["", f"Loop speed ({speed['job']}): prunekit {speed['prunekit_tokens_per_second']:.0f} tokens/s, "
                      f"Hugging Face Trainer + PEFT {speed['hf_trainer_tokens_per_second']:.0f} tokens/s "
                      f"(seconds per run: prunekit {speed['prunekit_seconds']}, Trainer {speed['hf_trainer_seconds']})."]
    for command in record.get("previous_commands", []):
        lines += ["", f"Earlier rows: `{command}`."]
    lines += ["", f"`{record['command']}` on {record['machine']}, {record['date']}; "
                  + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", default="runs/pruned35")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--methods", default="lora,lora+distill,distill,full",
                        help="methods, each optionally with settings: lora,distill:lr=2e-4,temperature=2")
    parser.add_argument("--keep", action="store_true",
                        help="keep the methods already in the record at --out (its dense and pruned figures too)")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=16, help="WikiText-2: every n-th 512-token window")
    parser.add_argument("--speed-steps", type=int, default=6, help="optimizer steps per loop-speed measurement")
    parser.add_argument("--speed-repeats", type=int, default=4, help="0: no loop-speed comparison")
    parser.add_argument("--speed-warmup", type=int, default=1, help="untimed runs of each loop before the timed ones")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery.json"))
    parser.add_argument("--speed-only", action="store_true",
                        help="only the loop-speed comparison, added to the record at --out")
    parser.add_argument("--markdown-only", action="store_true", help="print the BENCHMARKS.md tables of the record at --out")
    args = parser.parse_args()
    if args.markdown_only:
        print(markdown(json.loads(args.out.read_text())))
        return 0

    # Every variant is checked before anything is loaded.
    if (args.keep or args.speed_only) and not args.out.is_file():
        raise SystemExit(f"--{'keep' if args.keep else 'speed-only'} adds to the record at {args.out}, and there is "
                         "none; point --out at an earlier record")
    data = RecoveryData(source="c4", seq_len=args.seq_len, held_out=8, data_dir=args.data_dir)
    variants = {}
    for variant in [] if args.speed_only else split_variants(args.methods):
        method, options = parse_variant(variant)
        settings = RecoverySettings(**{"method": method, "tokens": args.tokens, "batch_size": args.batch_size,
                                       "data": data, "eval_every": 0, "checkpoint_every": 0, **options})
        try:
            settings.validate()
        except RecoveryError as error:
            raise SystemExit(f"variant {variant!r}: {error}") from None
        variants[variant] = (options, settings)

    started = time.perf_counter()
    teacher, tokenizer = prunekit.load(args.teacher)
    record = {
        "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "versions": versions(), "pruned": args.pruned, "tokens": args.tokens,
        "protocol": {"train": f"c4, {args.seq_len}-token rows, seed 0, batch {args.batch_size}",
                     "eval": f"wikitext2 raw test, 512-token windows, every {args.eval_every}th, fp32"},
        "methods": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")

    if args.speed_only:
        record = {**json.loads(args.out.read_text()), "speed_command": record["command"]}
    elif args.keep:
        previous = json.loads(args.out.read_text())
        record["methods"] = previous["methods"]
        record["dense_ppl"], record["pruned_ppl"] = previous["dense_ppl"], previous["pruned_ppl"]
        record["previous_commands"] = previous.get("previous_commands", []) + [previous["command"]]
    else:
        record["dense_ppl"] = wikitext_ppl(teacher, tokenizer, args.eval_every, args.data_dir)
        record["pruned_ppl"] = wikitext_ppl(prunekit.load(args.pruned)[0], tokenizer, args.eval_every, args.data_dir)
        print(f"dense {record['dense_ppl']}  pruned {record['pruned_ppl']}", flush=True)
    for variant, (options, settings) in variants.items():
        student, _ = prunekit.load(args.pruned)
        t0 = time.perf_counter()
        model, run = recover_loaded(student, tokenizer, settings, teacher=teacher if settings.needs_teacher else None)
        wall = time.perf_counter() - t0
        ppl = wikitext_ppl(model, tokenizer, args.eval_every, args.data_dir)
        gap = record["pruned_ppl"] - record["dense_ppl"]
        record["methods"][variant] = {
            "lr": settings.learning_rate, "settings": {"temperature": settings.temperature, "ce_weight": settings.ce_weight,
                                                       "hidden_weight": settings.hidden_weight, **options}, "wikitext2_ppl": ppl, "gap_closed": round((record["pruned_ppl"] - ppl) / gap, 4),
            "held_out_c4_ppl": run["eval"], "tokens": run["tokens"], "steps": run["total_steps"],
            "train_tokens_per_second": run["tokens_per_second"], "wall_seconds": round(wall, 1),
            "trainable_params": run["trainable_params"], "loss_first_last": [run["loss"][0], run["loss"][-1]],
        }
        print(f"{variant:13s} ppl {ppl:8.2f}  gap closed {record['methods'][variant]['gap_closed']:.1%}  "
              f"{run['tokens_per_second']:.0f} tok/s", flush=True)
        save()
        del model, student

    if args.speed_repeats == 0:
        record["seconds"] = round(time.perf_counter() - started, 1)
        save()
        return 0
    # Loop speed: the same LoRA job through our loop and through HF Trainer, alternating.
    settings = RecoverySettings(method="lora", tokens=args.speed_steps * args.batch_size * args.seq_len,
                                batch_size=args.batch_size, data=RecoveryData(source="c4", seq_len=args.seq_len,
                                                                              held_out=0, data_dir=args.data_dir),
                                eval_every=0, checkpoint_every=0)
    ids, _ = recovery_rows(settings.data, tokenizer, args.speed_steps * args.batch_size)
    def time_ours() -> float:
        student, _ = prunekit.load(args.pruned)
        return recover_loaded(student, tokenizer, settings, progress=False)[1]["train_seconds"]

    def time_theirs() -> float:
        student, _ = prunekit.load(args.pruned)
        return hf_trainer_seconds(student, ids, settings, args.speed_steps)

    # One untimed run of each first: the first training run in a process pays one-time costs
    # (kernel selection, allocator growth) that would land on whichever loop goes first.
    for _ in range(args.speed_warmup):
        time_ours(), time_theirs()
    ours, theirs = [], []
    for repeat in range(args.speed_repeats):
        # alternate which loop goes first, so that drift within a pair hits both alike
        if repeat % 2 == 0:
            ours.append(time_ours()), theirs.append(time_theirs())
        else:
            theirs.append(time_theirs()), ours.append(time_ours())
    tokens = args.speed_steps * args.batch_size * args.seq_len
    record["loop_speed"] = {
        "job": f"LoRA r{settings.lora_rank} all linear layers, {args.speed_steps} steps of {args.batch_size} x "
               f"{args.seq_len} tokens, seconds of the training loop (set-up excluded on both sides), "
               f"{args.speed_warmup} untimed run of each first, then {args.speed_repeats} repeats alternating "
               f"which loop goes first",
        "prunekit_tokens_per_second": round(tokens / statistics.median(ours), 1),
        "hf_trainer_tokens_per_second": round(tokens / statistics.median(theirs), 1),
        "prunekit_seconds": [round(s, 2) for s in ours], "hf_trainer_seconds": [round(s, 2) for s in theirs],
    }
    record["speed_seconds" if args.speed_only else "seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(record["loop_speed"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
