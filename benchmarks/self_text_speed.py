"""Speed of sampling `self` text (the teacher writes the training data) on a GPU, by precision.

A SmolLM2-135M-shaped model with random weights (speed does not depend on the values) samples
--rows rows of --seq-len tokens, --batch-size rows at a time, with prunekit's sampler: fp32 as
loaded, fp32 with TF32 matrix products, under bf16 autocast, and from a bf16 copy (prunekit's
default on a GPU); then, with --batch-sizes, the default at other numbers of rows per step (one
batch each), with peak GPU memory; with --profile, where the time of a step of the default goes
(GPU busy time against wall time, and the operators that take most). One process, one after
another.

    python benchmarks/self_text_speed.py --tokenizer runs/pruned35 --out benchmarks/results/self_text_speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from prunekit.data.calibration import SELF_TEXT_DTYPE_GPU, sample_self_tokens
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a directory with SmolLM2's tokenizer")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="", help="also the default at these rows per step, e.g. 2048,4096")
    parser.add_argument("--profile", action="store_true",
                        help="profile 32 tokens of sampling at --batch-size rows under torch.profiler")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes takes row counts such as 2048,4096; got {args.batch_sizes!r}")
    if not torch.cuda.is_available():
        print("self_text_speed.py times GPU sampling and needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).cuda().eval()
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(), "versions": versions(), "rows": args.rows,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens_per_second": {}}
    # (sampling dtype, TF32 products, context): the model is fp32, as recovery loads a teacher;
    # "bf16_copy" is prunekit's default on a GPU (SELF_TEXT_DTYPE_GPU)
    modes = {"fp32": (torch.float32, False, contextlib.nullcontext),
             "tf32": (torch.float32, True, contextlib.nullcontext),
             "bf16_autocast": (torch.float32, False, lambda: torch.autocast("cuda", dtype=torch.bfloat16)),
             "bf16_copy": (torch.bfloat16, False, contextlib.nullcontext)}
    for dtype in (torch.float32, torch.bfloat16):  # warm-up
        sample_self_tokens(model, tokenizer, n_samples=args.batch_size, seq_len=16, seed=0, batch_size=args.batch_size,
                           dtype=dtype, progress=False)
    for name, (dtype, tf32, context) in modes.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.cuda.synchronize()
        started = time.perf_counter()
        with context():
            sample_self_tokens(model, tokenizer, n_samples=args.rows, seq_len=args.seq_len, seed=0,
                               batch_size=args.batch_size, dtype=dtype, progress=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        record["tokens_per_second"][name] = round(args.rows * args.seq_len / seconds)
        print(name, record["tokens_per_second"][name], flush=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.profile:
        record["profile"] = profile(model, tokenizer, args.batch_size)
        print(json.dumps(record["profile"], indent=1), flush=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    for batch in batch_sizes:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            sample_self_tokens(model, tokenizer, n_samples=batch, seq_len=args.seq_len, seed=0, batch_size=batch,
                               progress=False)  # in prunekit's default dtype on a GPU
        except torch.OutOfMemoryError as error:
            record.setdefault("by_batch_size", {})[str(batch)] = {"error": str(error).splitlines()[0][:300]}
            continue
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        record.setdefault("by_batch_size", {})[str(batch)] = {
            "tokens_per_second": round(batch * args.seq_len / seconds),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(batch, record["by_batch_size"][str(batch)], flush=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    return 0


def profile(model, tokenizer, rows: int, tokens: int = 32) -> dict:
    """Wall time of sampling `tokens` tokens per row against the time the GPU spent in kernels: a
    step whose kernels fill a small share of its wall time is bound by launching them."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        sample_self_tokens(model, tokenizer, n_samples=rows, seq_len=tokens, seed=0, batch_size=rows, progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = profiler.key_averages()
    kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    operators = [event for event in events if event.device_type == torch.autograd.DeviceType.CPU]

    def per_token(microseconds: float) -> float:
        return round(microseconds / 1000 / tokens, 3)

    return {"rows": rows, "tokens": tokens, "sampling_dtype": str(SELF_TEXT_DTYPE_GPU), "wall_ms_per_token": round(1000 * wall / tokens, 2),
            "gpu_busy_ms_per_token": per_token(sum(k.self_device_time_total for k in kernels)),
            "kernel_launches_per_token": round(sum(k.count for k in kernels) / tokens, 1),
            "top_kernels_ms_per_token": {k.key[:90]: per_token(k.self_device_time_total)
                                         for k in sorted(kernels, key=lambda k: -k.self_device_time_total)[:10]},
            "top_operators_cpu_ms_per_token": {o.key[:90]: per_token(o.self_cpu_time_total)
                                               for o in sorted(operators, key=lambda o: -o.self_cpu_time_total)[:10]}}

if __name__ == "__main__":
    raise SystemExit(main())
