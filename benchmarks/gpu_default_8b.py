"""The default prune (magnitude order, log_increase budgets, FFN channels, structured OBS) of a
Llama-3-8B-shaped model with random weights on one GPU, timed with `prune_loaded` as `prunekit
prune` runs it: the whole model on the device, and layer by layer (weights in CPU memory, one layer
on the device), beside the previous default (Taylor, global allocation, heads, KV groups and
channels, sequential refit) on the whole model. Peak GPU memory is torch's peak allocation.

    python benchmarks/gpu_default_8b.py --out benchmarks/results/default_prune_8b_gpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import synchronize  # noqa: E402
from random_llama import LLAMA3_8B, random_weights  # noqa: E402


# `--tiny`: the same code path at toy sizes, so that a CPU smoke test can run the script before a GPU call
TINY = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 1024}


def build(home: str, args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {**LLAMA3_8B, **(TINY if args.tiny else {}), **({"num_hidden_layers": args.layers} if args.layers else {})}
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return random_weights(model, home, fill_device=args.device).eval()



def run(name: str, settings, args, ids) -> dict:
    from prunekit.pipeline import prune_loaded

    model = build("cpu" if settings.layer_by_layer else args.device, args)
    synchronize(torch.device(args.device))
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    record = prune_loaded(model, None, settings, progress=False, calibration=(ids, None))
    synchronize(torch.device(args.device))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    result = {"name": name, "seconds": round(time.perf_counter() - started, 1), "peak_gpu_gib": peak and round(peak, 2),
              "removed": record["removed"], "settings": {k: getattr(settings, k) for k in
                                                          ("criterion", "allocation", "prune", "compensation",
                                                           "layer_by_layer")}}
    print(json.dumps(result), flush=True)
    del model, record
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    from prunekit.pipeline import CalibrationSettings, PruneSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a smoke test")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, same code path (a CPU smoke test)")
    parser.add_argument("--runs", default="default,layer-by-layer,previous",
                        help="which of: default, layer-by-layer, previous (comma-separated)")
    args = parser.parse_args()
    ids = torch.randint(0, (TINY if args.tiny else LLAMA3_8B)["vocab_size"], (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSettings(n_samples=args.rows, seq_len=args.seq_len)
    default = PruneSettings(target=args.target, device=args.device, batch_size=4, calibration=calibration)
    # Taylor's backward pass at 4 rows of 2048 peaks at 93 GiB (GPU_BENCHMARKS.md): 2 rows fit an H100
    previous = PruneSettings(target=args.target, device=args.device, batch_size=2, calibration=calibration,
                             criterion="taylor", allocation="global", prune=("channel", "head", "kv_group"),
                             compensation="sequential")
    record = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
              "command": " ".join(["python", "benchmarks/gpu_default_8b.py", *sys.argv[1:]]),
              "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "versions": {"torch": torch.__version__}, "calibration": f"random tokens, {args.rows} x {args.seq_len}",
              "runs": []}
    out = Path(args.out)
    chosen = {"default": ("default, whole model", default),
              "layer-by-layer": ("default, layer by layer", PruneSettings(**{**default.__dict__, "layer_by_layer": True})),
              "previous": ("previous default (Taylor), whole model", previous)}
    unknown = sorted(set(args.runs.split(",")) - set(chosen))
    if unknown:
        parser.error(f"--runs takes {', '.join(chosen)}; got {', '.join(unknown)}")
    for key in args.runs.split(","):
        name, settings = chosen[key]
        try:
            record["runs"].append(run(name, settings, args, ids))
        except Exception as error:  # one failed run (out of memory above all) must not lose the others' figures
            record["runs"].append({"name": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
            print(record["runs"][-1], flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
