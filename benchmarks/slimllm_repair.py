"""Issue-27 benchmark: SlimLLM's training-free repair against prunekit's least-squares refit, on
SmolLM2-135M pruned with SlimLLM's scores and allocation (criterion slimllm, allocation slimllm,
heads, KV groups and FFN channels), at several ratios, without training.

Repairs, each fitted once from the dense model's calibration statistics and applied before the
cut: `none`; `scale-bias`, SlimLLM's per-output-dimension line a * kept + b on o_proj and down_proj
(prunekit.compensate.scale_bias; the biases are added to the model); `least-squares`, prunekit's
one-shot refit of the kept o_proj / down_proj columns; `least-squares+bias`, the same with a bias
fitted jointly. (The pruning grid's `sequential` refit, on the pruned model's own inputs, is in
grid_slimllm_cpu.json.) Protocol as benchmarks/pruning_grid.py: C4 128 x 512 calibration, seed 0;
WikiText-2 test read as it is, 512-token windows, every 16th, fp32.

    python benchmarks/slimllm_repair.py --data-dir /work/shared/data --out benchmarks/results/slimllm_repair_cpu.json
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
from prunekit.compensate import compensate
from prunekit.compensate.bias import enable_output_biases
from prunekit.compensate.scale_bias import scale_and_bias
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.export.huggingface import versions
from prunekit.models.architecture import architecture_for
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.plan.plan import resolve_plan
from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
from prunekit.score import collect_layer_stats, score_model
from prunekit.score.slimllm import covariance

REPAIRS = ("none", "scale-bias", "least-squares", "least-squares+bias")


@torch.no_grad()
def repair_with_lines(model, plan, stats) -> None:
    """SlimLLM's repair of every narrowed o_proj / down_proj, in place, before the cut."""
    arch = architecture_for(model.config.model_type)
    structure = prunekit.model_structure(model)
    layers = decoder_layers(model, arch.to_dict())
    enable_output_biases(model, arch, attention=True, mlp=True)
    for kept in resolve_plan(plan, structure):
        i, before = kept.source_index, structure.layers[kept.source_index]
        jobs = []
        if kept.query_heads and len(kept.query_heads) < before.num_attention_heads:
            columns = [h * structure.head_dim + d for h in kept.query_heads for d in range(structure.head_dim)]
            jobs.append((getattr(getattr(layers[i], arch.attention), arch.o_proj), stats[i].attention_input, columns))
        if kept.channels and len(kept.channels) < before.intermediate_size:
            jobs.append((getattr(getattr(layers[i], arch.mlp), arch.down_proj), stats[i].mlp_input, list(kept.channels)))
        for projection, feature_stats, columns in jobs:
            keep = torch.tensor(columns)
            weight, bias = scale_and_bias(projection.weight, keep, feature_stats.mean, covariance(feature_stats),
                                          projection.bias)
            projection.weight[:, keep] = weight.to(projection.weight.dtype)
            projection.bias.copy_(bias.to(projection.bias.dtype))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--repairs", default=",".join(REPAIRS))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/slimllm_repair_cpu.json")
    args = parser.parse_args()
    unknown = sorted(set(args.repairs.split(",")) - set(REPAIRS))
    if unknown:
        parser.error(f"unknown repairs {unknown}; choose from {list(REPAIRS)}")
    out = Path(args.out)
    started = time.perf_counter()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    ids = calibration_tokens("c4", tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                             data_dir=args.data_dir)

    def evaluate(model) -> float:
        return round(perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                                window_every=args.eval_every, protocol="raw", batch_size=args.batch_size,
                                data_dir=args.data_dir, progress=False).perplexity, 3)

    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "device": f"cpu x{torch.get_num_threads()}",
              "versions": versions(),
              "protocol": {"calibration": f"c4 {args.calib_samples}x{args.calib_seq_len} seed 0",
                           "eval": f"wikitext2 raw test, 512-token windows, every {args.eval_every}th, fp32"},
              "dense": evaluate(dense), "runs": []}
    t0 = time.perf_counter()
    stats = collect_layer_stats(dense, ids, batch_size=args.batch_size, with_gram=True, progress=False)
    record["stats_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    scores = score_model(dense, "slimllm", ids, batch_size=args.batch_size, progress=False)
    record["score_seconds"] = round(time.perf_counter() - t0, 1)
    record["layer_cos"] = [round(c, 4) for c in scores.meta["layer_cos"]]
    structure = prunekit.model_structure(dense)
    print(f"dense {record['dense']}; set-up {time.perf_counter() - started:.0f} s", flush=True)
    for ratio in (float(r) for r in args.ratios.split(",")):
        plan = make_plan(structure, scores, PlannerSettings(target=ratio, allocation="slimllm"), comparable=False)
        for repair in args.repairs.split(","):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if repair == "scale-bias":
                repair_with_lines(model, plan, stats)
            elif repair.startswith("least-squares"):
                compensate(model, plan, stats, bias=repair.endswith("+bias"))
            repair_seconds = time.perf_counter() - t0
            after = prunekit.apply_plan(model, plan)
            run = {"target": ratio, "repair": repair,
                   "removed_non_embedding": round(removed_fraction(structure, after, "non-embedding"), 4),
                   "perplexity": evaluate(model), "repair_seconds": round(repair_seconds, 1),
                   "kept": [[s.num_attention_heads, s.num_key_value_heads, s.intermediate_size] for s in after.layers]}
            record["runs"].append(run)
            print(f"r={ratio:.2f} {repair:20s} removed={run['removed_non_embedding']:.3f} ppl={run['perplexity']:.2f}",
                  flush=True)
            out.write_text(json.dumps(record, indent=1) + "\n")  # partial results survive a timeout
            del model
    record["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
