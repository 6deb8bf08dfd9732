"""Recovery training on one GPU and on several, through `accelerate launch` (issue 8).

Runs the same `prunekit recover` command under `accelerate launch` with 1, 2, ... processes
(DDP), and optionally with FSDP on all of them, each with the same per-process batch and the
same global token budget (so the multi-GPU run takes 1/N of the steps), and reads the training
tokens/s that each run records in its prunekit.json (all processes' tokens over the seconds of
the training loop, set-up and evaluation excluded). The speedup is tokens/s on N GPUs over
tokens/s on one, from runs made one after the other in the same call.

    python benchmarks/gpu_recovery_scale.py --student runs/pruned35 --teacher smollm2-135m \\
        --data-dir ../shared/data --gpus 1,2 --fsdp --out benchmarks/results/gpu_recovery_scale.json
    # speed does not depend on weight values: a random Llama-3.2-1B-shaped model, teacher = itself
    python benchmarks/gpu_recovery_scale.py --random-shape llama-1b --tokenizer runs/pruned35 \\
        --text-from ../shared/data/c4/c4_en_train_shard00000_first1000.jsonl --gpus 1,2 --fsdp --out ...

Without a GPU it stops with a message (CI has none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from prunekit.data.sources import read_jsonl_field
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions


# Llama-3.2-1B's shape with the vocabulary of the tokenizer it is given.
SHAPES = {"llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)}


def random_model(shape: str, tokenizer_dir: str, out: Path) -> Path:
    """A model directory with random weights of `shape` and the tokenizer of `tokenizer_dir`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def text_file(jsonl: str, copies: int, out: Path) -> Path:
    """The documents of a .jsonl `text` field, `copies` times over: enough tokens for any budget
    (repeated text trains no worse for a speed measurement)."""
    texts = read_jsonl_field(jsonl, "text")
    out.write_text("\n\n".join(texts * copies))
    return out


def launch_command(args, processes: int, fsdp: bool, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if fsdp:
        # Wrapped by decoder layer: size-based wrapping can put tied input and output embeddings
        # into different units.
        launcher += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy",
                     "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", args.fsdp_layer_class,
                     "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    elif processes > 1:
        launcher += ["--multi_gpu"]
    return launcher + ["-m", "prunekit", "recover", args.student, "--teacher", args.teacher, "--method", args.method,
                       "--data", args.data, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--eval-every", "0", "--checkpoint-every", "0",
                       "--held-out", "0", "--out", str(out), "--force"] + (
        ["--data-dir", args.data_dir] if args.data_dir else [])


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
    parser.add_argument("--gpus", default="1,2", help="process counts to run with DDP (one process per GPU)")
    parser.add_argument("--fsdp", action="store_true", help="also run FSDP (full sharding) on the largest count")
    parser.add_argument("--fsdp-layer-class", default="LlamaDecoderLayer", help="the decoder layer class FSDP wraps")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-recovery-scale"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.gpus.split(",")]
    except ValueError:
        parser.error(f"--gpus takes process counts such as 1,2; got {args.gpus!r}")
    if min(counts) < 1:
        parser.error(f"--gpus takes process counts of at least 1; got {args.gpus!r}")
    if (args.student is None) == (args.random_shape is None) or (args.random_shape and not args.tokenizer):
        parser.error("name either --student, or --random-shape with --tokenizer")
    if not torch.cuda.is_available():
        print("gpu_recovery_scale.py measures multi-GPU training and needs CUDA GPUs; none is visible here",
              file=sys.stderr)
        return 2
    if max(counts) > torch.cuda.device_count():
        print(f"--gpus asks for {max(counts)} GPUs and {torch.cuda.device_count()} are visible; lower --gpus",
              file=sys.stderr)
        return 2

    args.work.mkdir(parents=True, exist_ok=True)
    if args.random_shape:
        args.student = args.teacher = str(random_model(args.random_shape, args.tokenizer, args.work / "random-model"))
    if args.text_from:
        args.data = str(text_file(args.text_from, 8, args.work / "text.txt"))
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(), "gpus_visible": torch.cuda.device_count(), "versions": versions(),
              "job": {"student": args.random_shape or args.student, "teacher": args.teacher, "method": args.method, "tokens": args.tokens,
                      "seq_len": args.seq_len, "batch_per_process": args.batch_size, "precision": "bf16 autocast"},
              "runs": {}}
    runs = [(f"ddp-{n}", n, False) for n in counts] + ([(f"fsdp-{max(counts)}", max(counts), True)] if args.fsdp else [])
    for name, processes, fsdp in runs:
        out = args.work / name
        started = time.perf_counter()
        done = subprocess.run(launch_command(args, processes, fsdp, out), capture_output=True, text=True)
        wall = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
            record["runs"][name] = {"status": "error", "wall_seconds": wall, "errors": list(dict.fromkeys(errors))[:10],
                                    "stderr_tail": done.stderr[-3000:]}
        else:
            recovery = json.loads((out / "prunekit.json").read_text())["recovery"]
            record["runs"][name] = {"status": "ok", "processes": processes, "fsdp": fsdp, "wall_seconds": wall,
                                    "world_size": recovery["world_size"], "steps": recovery["total_steps"],
                                    "tokens": recovery["tokens"], "train_seconds": round(recovery["train_seconds"], 2),
                                    "tokens_per_second": recovery["tokens_per_second"]}
        print(name, json.dumps(record["runs"][name])[:600], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    base = record["runs"].get(f"ddp-{counts[0]}", {})
    for name, run in record["runs"].items():
        if run.get("status") == "ok" and base.get("status") == "ok":
            run["speedup_over_first"] = round(run["tokens_per_second"] / base["tokens_per_second"], 3)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v.get("speedup_over_first") for k, v in record["runs"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
