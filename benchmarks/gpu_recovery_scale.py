"""Recovery training on one GPU and on several, through `accelerate launch` (issue 8).

Runs the same `prunekit recover` command under `accelerate launch` with 1, 2, ... processes
(DDP), and optionally sharded (`--shard`: FSDP2, weights, gradients and AdamW state split over
the processes) on the largest count, each with the same per-process batch and the same global
token budget (so the multi-GPU run takes 1/N of the steps), and reads the training tokens/s that
each run records in its prunekit.json (all processes' tokens over the seconds of the training
loop, set-up and evaluation excluded). The speedup is tokens/s on N GPUs over tokens/s on one,
from runs made one after the other in the same call. Before each run, the same job's memory
check on one process is recorded: for a model whose training fits no single GPU, that is the
refusal a user without sharding would get.

    python benchmarks/gpu_recovery_scale.py --student runs/pruned35 --teacher smollm2-135m \\
        --data-dir ../shared/data --gpus 1,2 --shard --out benchmarks/results/gpu_recovery_scale.json
    # speed does not depend on weight values: a random Llama-3.2-1B-shaped model, teacher = itself
    python benchmarks/gpu_recovery_scale.py --random-shape llama-1b --tokenizer runs/pruned35 \\
        --text-from ../shared/data/c4/c4_en_train_shard00000_first1000.jsonl --gpus 1,2 --shard --out ...
    # Llama-3-8B's shape, full distillation: fits no single H200, so sharded only
    python benchmarks/gpu_recovery_scale.py --random-shape llama3-8b --tokenizer runs/pruned35 \\
        --text-from ... --gpus "" --shard 2 --batch-size 2 --tokens 131072 --out ...

Without a GPU it stops with a message (CI has none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prunekit.data.sources import read_jsonl_field
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions
from random_llama import LLAMA3_8B, random_weights


# Llama-3.2-1B's shape with the vocabulary of the tokenizer it is given; Llama-3-8B's with its own
# (a smaller tokenizer's ids all lie inside it).
SHAPES = {"llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
          "llama3-8b": dict(LLAMA3_8B, tie_word_embeddings=False),
          "tiny": dict(vocab_size=50000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)}


WORK_MARK = ".gpu_recovery_scale"  # marks a --work folder as this script's scratch space


def random_model(shape: str, tokenizer_dir: str, out: Path) -> Path:
    """A model directory with random bf16 weights of `shape` (filled on the GPU where there is
    one) and the tokenizer of `tokenizer_dir`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**{"vocab_size": len(tokenizer), **SHAPES[shape]}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    random_weights(model, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def text_file(jsonl: str, copies: int, out: Path) -> Path:
    """The documents of a .jsonl `text` field, `copies` times over: enough tokens for any budget
    (repeated text trains no worse for a speed measurement)."""
    texts = read_jsonl_field(jsonl, "text")
    out.write_text("\n\n".join(texts * copies))
    return out


def recover_arguments(args, out: Path) -> list[str]:
    return ["-m", "prunekit", "recover", args.student, "--teacher", args.teacher, "--method", args.method,
            "--data", args.data, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--eval-every", "0", "--checkpoint-every", "0",
            "--held-out", "0", "--out", str(out), "--force"] + (["--data-dir", args.data_dir] if args.data_dir else []) + (
        ["--activation-checkpointing"] if args.activation_checkpointing else [])


def launch_command(args, processes: int, shard: bool, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if processes > 1:
        launcher += ["--multi_gpu"]
    return launcher + recover_arguments(args, out) + (["--shard"] if shard else [])


def one_gpu_check(args) -> str:
    """What `prunekit recover` says of this job on one GPU, unsharded, at its memory check (the
    same estimate, made before any weight is read): "fits", or its refusal."""
    from prunekit.models.loading import load_skeleton, resolve_model_source
    from prunekit.models.memory import InsufficientMemoryError, check_fits, recovery_estimate
    from prunekit.models.structure import model_structure
    from prunekit.recover.train import get_method

    structures = [model_structure(load_skeleton(resolve_model_source(m))) for m in (args.student, args.teacher)]
    needs = recovery_estimate(*structures, "float32", lora=get_method(args.method).lora, batch_size=args.batch_size,
                              seq_len=args.seq_len, activation_checkpointing=args.activation_checkpointing)
    try:
        check_fits(f"recovering {args.random_shape or args.student}", needs, "cuda", hints="shard it over GPUs")
    except InsufficientMemoryError as error:
        return str(error)
    return "fits"


def parse_counts(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None, help="pruned model directory")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default=None,
                        help="instead of --student: a model of this shape with random weights, its own teacher")
    parser.add_argument("--tokenizer", default=None, help="with --random-shape: the directory whose tokenizer it uses")
    parser.add_argument("--data", default="c4", help="training data as `prunekit recover --data` takes it")
    parser.add_argument("--text-from", default=None,
                        help="train on the documents of this .jsonl repeated 8 times (a .txt made in --work)")
    parser.add_argument("--method", default="distill")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="global token budget of every run")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per process per step")
    parser.add_argument("--gpus", default="1,2", help="process counts to run with DDP (one process per GPU; '' for none)")
    parser.add_argument("--shard", nargs="?", type=int, const=0, default=None, metavar="N",
                        help="also run sharded (FSDP2) on N processes (default: the largest of --gpus)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="every run recomputes activations in the backward pass (for larger batches)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-recovery-scale"),
                        help="scratch folder for the runs (replaced run by run; one this script did not make is refused)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        counts = parse_counts(args.gpus)
    except ValueError:
        parser.error(f"--gpus takes process counts such as 1,2; got {args.gpus!r}")
    if counts and min(counts) < 1:
        parser.error(f"--gpus takes process counts of at least 1; got {args.gpus!r}")
    shard = None
    if args.shard is not None:
        shard = args.shard or max(counts, default=0)
    if shard is not None and shard < 2:
        parser.error("--shard needs at least 2 processes: give --shard N, or --gpus with a count of 2 or more")
    if not counts and shard is None:
        parser.error("nothing to run: give --gpus counts, --shard N, or both")
    if (args.student is None) == (args.random_shape is None) or (args.random_shape and not args.tokenizer):
        parser.error("name either --student, or --random-shape with --tokenizer")
    if args.work.exists() and any(args.work.iterdir()) and not (args.work / WORK_MARK).exists():
        parser.error(f"--work {args.work} holds files this script did not write, and its runs would replace "
                     "folders there; give an empty or new folder")
    if not torch.cuda.is_available():
        print("gpu_recovery_scale.py measures multi-GPU training and needs CUDA GPUs; none is visible here",
              file=sys.stderr)
        return 2
    if max(counts + [shard or 0]) > torch.cuda.device_count():
        print(f"the runs ask for {max(counts + [shard or 0])} GPUs and {torch.cuda.device_count()} are visible; "
              "lower --gpus / --shard", file=sys.stderr)
        return 2

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / WORK_MARK).touch()
    if args.random_shape:
        started = time.perf_counter()
        args.student = args.teacher = str(random_model(args.random_shape, args.tokenizer, args.work / "random-model"))
        torch.cuda.empty_cache()  # the memory check below reads the GPU's free memory
        print(f"random {args.random_shape} model saved in {time.perf_counter() - started:.0f} s", flush=True)
    if args.text_from:
        args.data = str(text_file(args.text_from, 8, args.work / "text.txt"))
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(), "gpus_visible": torch.cuda.device_count(), "versions": versions(),
              "job": {"student": args.random_shape or args.student, "teacher": args.teacher, "method": args.method, "tokens": args.tokens,
                      "seq_len": args.seq_len, "batch_per_process": args.batch_size, "precision": "bf16 autocast",
                      "activation_checkpointing": args.activation_checkpointing},
              "one_gpu_unsharded_memory_check": one_gpu_check(args),
              "runs": {}}
    print("one GPU, unsharded:", record["one_gpu_unsharded_memory_check"], flush=True)
    runs = [(f"ddp-{n}", n, False) for n in counts] + ([(f"sharded-{shard}", shard, True)] if shard else [])
    for name, processes, sharded in runs:
        out = args.work / name
        started = time.perf_counter()
        done = subprocess.run(launch_command(args, processes, sharded, out), capture_output=True, text=True)
        wall = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
            record["runs"][name] = {"status": "error", "wall_seconds": wall, "errors": list(dict.fromkeys(errors))[:10],
                                    "stderr_tail": done.stderr[-3000:]}
        else:
            recovery = json.loads((out / "prunekit.json").read_text())["recovery"]
            record["runs"][name] = {"status": "ok", "processes": processes, "sharded": sharded, "wall_seconds": wall,
                                    "world_size": recovery["world_size"], "steps": recovery["total_steps"],
                                    "tokens": recovery["tokens"], "train_seconds": round(recovery["train_seconds"], 2),
                                    "tokens_per_second": recovery["tokens_per_second"],
                                    "peak_gpu_gib": recovery.get("peak_gpu_gib")}
            shutil.rmtree(out, ignore_errors=True)  # the next run needs the disk
        print(name, json.dumps(record["runs"][name])[:600], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    base = record["runs"].get(f"ddp-{counts[0]}", {}) if counts else {}
    for name, run in record["runs"].items():
        if run.get("status") == "ok" and base.get("status") == "ok":
            run["speedup_over_first"] = round(run["tokens_per_second"] / base["tokens_per_second"], 3)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v.get("speedup_over_first") for k, v in record["runs"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
