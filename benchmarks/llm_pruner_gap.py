"""Issue 27: why prunekit's LLM-Pruner setting (Taylor, uniform, FFN channels of layers 4-27, no
repair) gives 656.92 at 50% of the non-embedding parameters where LLM-Pruner's own code gave 271.7
(benchmarks/results/llm_pruner_check_cpu.json, ENVIRONMENT.md).

LLM-Pruner's hf_prune.py (horseee/LLM-Pruner) scores an FFN channel as prunekit's element-wise
Taylor does (`--taylor param_first`: |w * dL/dw| summed over the gate and up rows and the down
column, group reduction `sum`), but its `--pruning_ratio` is the fraction of channels each pruned
layer loses (MetaPruner's `ch_sparsity`, local pruning), not a fraction of the model. Each variant
here changes one thing against the measured setting, from the same dense model and calibration rows:
- `per-layer` targets: layers 4-27 lose the given fraction of their channels, as `--pruning_ratio`
  does (0.5 removes about 30% of the non-embedding parameters here, 0.2 about 12%);
- `fp32`: the gradient without prunekit's bf16 autocast (LLM-Pruner takes it in fp16 on a GPU);
- `rows10`: the gradient on 10 calibration rows (LLM-Pruner's `--num_examples` default is 10);
- `vector`: |sum of w * dL/dw| per channel (LLM-Pruner's `--taylor vectorize`);
- `global`: channels ranked across layers 4-27 instead of the same width in each (`--global_pruning`).
Calibration C4 128 x 512, seed 0; WikiText-2 `wiki.test.raw`, 512-token windows, every 16th, fp32.

    python benchmarks/llm_pruner_gap.py --data-dir ../shared/data --out benchmarks/results/llm_pruner_gap_cpu.json
    python benchmarks/llm_pruner_gap.py --variants as-measured@0.5,per-layer@0.5 ...   # a subset
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

PROTECT = (0, 1, 2, 3, 28, 29)  # the layers LLM-Pruner's measured run left whole (it pruned MLPs 4-27)
# name -> criterion options; what each variant changes against the measured setting
SCORINGS = {"as-measured": {}, "per-layer": {}, "fp32": {"autocast": False}, "rows10": {"tokens": 10 * 512},
            "vector": {"variant": "vector"}, "global": {}}
DEFAULT_VARIANTS = "as-measured@0.5,per-layer@0.5,per-layer@0.2,rows10@0.5,fp32@0.5,vector@0.5"


def parse_variants(text: str) -> list[tuple[str, float]]:
    variants = []
    for item in filter(None, text.split(",")):
        name, _, ratio = item.partition("@")
        if name not in SCORINGS or not ratio:
            raise SystemExit(f"--variants takes NAME@RATIO items with NAME one of {', '.join(SCORINGS)}; got {item!r}")
        variants.append((name, float(ratio)))
    return variants


def per_layer_target(structure, ratio: float, ffn_multiple: int) -> tuple[float, int]:
    """The non-embedding target at which the uniform planner leaves every unprotected layer
    int(width * (1 - ratio)) channels, as LLM-Pruner's MetaPruner does, and that width."""
    width = next(s.intermediate_size for i, s in enumerate(structure.layers) if i not in PROTECT)
    kept = int(width * (1 - ratio))
    kept -= kept % ffn_multiple
    per_channel = 3 * structure.hidden_size  # gate row, up row, down column
    pruned_layers = structure.num_layers - len(PROTECT)
    removed = pruned_layers * (width - kept) * per_channel
    # a hair under the exact fraction, so the planner's last move lands on `kept`, not one past it
    return removed / structure.non_embedding_params - 1e-9, kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"NAME@RATIO items; NAME one of {', '.join(SCORINGS)}; RATIO of the non-embedding "
                             "parameters, or for per-layer the fraction of each pruned layer's channels")
    parser.add_argument("--ffn-multiple", type=int, default=4, help="FFN widths in multiples of this (the measured "
                        "run used 8; 4 lets per-layer 0.2 keep LLM-Pruner's 1,228 channels)")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_pruner_gap_cpu.json"))
    args = parser.parse_args()
    variants = parse_variants(args.variants)

    import prunekit
    from prunekit.data import calibration_tokens
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.export.files import atomic_write_text
    from prunekit.export.huggingface import versions
    from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
    from prunekit.score import get_criterion, score_model

    started = time.perf_counter()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    ids = calibration_tokens("c4", tokenizer, n_samples=128, seq_len=512, seed=0, data_dir=args.data_dir)
    structure = prunekit.model_structure(dense)
    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads",
        "versions": versions(),
        "setting": f"criterion taylor, allocation uniform (global where a run says so), prune channel, compensation "
                   f"none, protect_layers {list(PROTECT)}, ffn_multiple {args.ffn_multiple}; calibration c4 128x512 seed 0; wikitext2 raw "
                   f"test, 512-token windows, every {args.eval_every}th, fp32",
        "runs": [],
    }
    scores_by_name: dict[str, tuple] = {}
    for name, ratio in variants:
        options = SCORINGS[name]
        key = json.dumps(options, sort_keys=True)
        if key not in scores_by_name:
            t0 = time.perf_counter()
            scores_by_name[key] = (score_model(dense, "taylor", ids, batch_size=args.batch_size, progress=False,
                                               **options), round(time.perf_counter() - t0, 1))
        scores, score_seconds = scores_by_name[key]
        if name == "per-layer":
            target, kept = per_layer_target(structure, ratio, args.ffn_multiple)
        else:
            target, kept = ratio, None
        allocation = "global" if name == "global" else "uniform"
        settings = PlannerSettings(target=target, allocation=allocation, prune=("channel",),
                                   ffn_multiple=args.ffn_multiple, protect_layers=PROTECT)
        plan = make_plan(structure, scores, settings, comparable=get_criterion("taylor").comparable)
        model = copy.deepcopy(dense)
        after = prunekit.apply_plan(model, plan)
        result = perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                            window_every=args.eval_every, protocol="raw", batch_size=args.batch_size,
                            data_dir=args.data_dir, progress=False)
        widths = [s.intermediate_size for i, s in enumerate(after.layers) if i not in PROTECT]
        widths = sorted(set(widths)) if allocation == "uniform" else widths
        run = {"variant": name, "ratio": ratio, "criterion_options": options, "allocation": allocation,
               "target": round(target, 6),
               "removed_non_embedding": round(removed_fraction(structure, after, "non-embedding"), 4),
               "kept_channels_pruned_layers": widths, "llm_pruner_kept": kept,
               "wikitext2_ppl": round(result.perplexity, 2), "windows": result.n_windows,
               "score_seconds": score_seconds}
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
        record["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")  # a killed run keeps what it had
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
