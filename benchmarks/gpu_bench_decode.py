"""`prunekit bench`'s two decode modes on a GPU, on a random Llama-3-8B-shaped model pruned 25%
(width: FFN channels, heads and KV groups, prunekit's planner on random scores) beside the dense one.

First a check that graph decode decodes: on a small random model in float32, and on the pruned 8B
shape in bfloat16, the greedy tokens of the static-cache step replayed from a CUDA graph equal those
of the same step run eagerly (and, for the small model, those of `generate`). Then
`benchmark_speed` (what `prunekit bench` runs) times the pair with `decode="graph"` (the GPU
default) and `decode="eager"`, and the record keeps both results and their tables.

    PYTHONPATH=src:benchmarks python benchmarks/gpu_bench_decode.py --out gpu_bench_decode.json   # on a CUDA machine
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gpu_speed import llama_config, materialize, plan_for, versions


def log(*parts) -> None:
    print(*parts, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--way", default="width")
    parser.add_argument("--prefill", default="4x1024", help="prefill batch x length")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def tokens_agree(device: torch.device) -> dict:
    """Graph replay, the eager static-cache step and generate give the same greedy tokens (float32)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from prunekit.evaluate.speed import static_cache_greedy_tokens

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(device).eval()
    prompt = torch.randint(3, 1000, (3, 20), device=device)
    graph = static_cache_greedy_tokens(model, prompt, 16, use_graph=True)
    eager = static_cache_greedy_tokens(model, prompt, 16, use_graph=False)
    generate_config = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   generation_config=generate_config)[:, 20:]
    return {"graph_equals_eager_static": bool(torch.equal(graph, eager)),
            "graph_equals_generate": bool(torch.equal(graph, generated)), "graph": graph.tolist()[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench_decode: no CUDA GPU is visible here; run it on a GPU machine", file=sys.stderr)
        return 2
    from prunekit.evaluate.speed import benchmark_speed, format_speed_table, static_cache_greedy_tokens

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    record = {"command": " ".join(sys.argv), "versions": versions(device), "settings": vars(args)}
    record["small_model_tokens"] = tokens_agree(device)
    log("small model:", record["small_model_tokens"])

    config = llama_config("llama3-8b")
    plan, _ = plan_for(config, args.way, args.target, 128, 0)
    dense = materialize(config, None, device, torch.bfloat16, 0)
    pruned = materialize(config, plan, device, torch.bfloat16, 0)
    prompt = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3)).to(device)
    graph = static_cache_greedy_tokens(pruned, prompt, 16, use_graph=True)
    eager = static_cache_greedy_tokens(pruned, prompt, 16, use_graph=False)
    record["pruned_8b_tokens"] = {"graph_equals_eager_static": bool(torch.equal(graph, eager)),
                                  "graph": graph.tolist()[0], "eager": eager.tolist()[0]}
    log("pruned 8B shape:", record["pruned_8b_tokens"])
    log(f"models built and checked in {time.time() - started:.0f} s")

    batch, length = (int(v) for v in args.prefill.split("x"))
    common = dict(device="cuda", dtype="bfloat16", prefill_batch=batch, prefill_len=length,
                  decode_batches=tuple(int(b) for b in args.decode_batches.split(",")),
                  decode_context=args.decode_context, decode_tokens=args.decode_tokens, warmup=1,
                  repeats=args.repeats)
    record["results"] = {}
    for mode in ("graph", "eager"):
        t0 = time.time()
        result = benchmark_speed(pruned, baseline=dense, decode=mode, **common)
        record["results"][mode] = {"speed": result.to_dict(), "table": format_speed_table(result),
                                   "seconds": round(time.time() - t0, 1)}
        log(f"\n--- decode {mode} ({time.time() - t0:.0f} s)\n{format_speed_table(result)}")
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
    record["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=1)
    log(f"done in {record['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
