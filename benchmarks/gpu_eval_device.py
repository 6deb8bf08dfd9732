"""Evaluation on a GPU against the CPU: `evaluate_model(device="cuda")` gives the perplexity that
the CPU gives, and a recipe whose evaluate stage (WikiText-2 and the original's own text) and bench
stage run on the GPU completes.

A small random Llama (4 layers, hidden 256) with the given tokenizer; WikiText-2 from the data
directory ($PRUNEKIT_DATA_DIR or --data-dir).

    python benchmarks/gpu_eval_device.py --tokenizer TOKENIZER_DIR --data-dir ../shared/data --out gpu_eval_device.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunekit
from prunekit.evaluate.run import evaluate_model
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a directory with a tokenizer (SmolLM2's, for example)")
    parser.add_argument("--data-dir", help="the shared data folder (default $PRUNEKIT_DATA_DIR)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_eval_device.py compares evaluation on a CUDA GPU with the CPU; no GPU is visible here",
              file=sys.stderr)
        return 2
    if args.data_dir:
        os.environ["PRUNEKIT_DATA_DIR"] = args.data_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    # initializer_range 0.1, not 0.02: logits far from uniform, so that a difference between devices would show
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(), "versions": versions(), "model": config.to_diff_dict()}
    with tempfile.TemporaryDirectory(prefix="prunekit-eval-device-") as work:
        model_dir = Path(work) / "model"
        prunekit.save_model(LlamaForCausalLM(config), tokenizer, model_dir)
        record["perplexity"] = {}
        for device in ("cpu", "cuda"):
            started = time.perf_counter()
            report = evaluate_model(model_dir, ppl=["wikitext2"], seq_len=512, window_every=8, device=device,
                                    progress=False)
            record["perplexity"][device] = {"wikitext2": report["perplexity"]["wikitext2"]["perplexity"],
                                            "recorded_device": report["model"]["device"],
                                            "seconds": round(time.perf_counter() - started, 2)}
        cpu, cuda = (record["perplexity"][d]["wikitext2"] for d in ("cpu", "cuda"))
        record["relative_difference"] = abs(cuda - cpu) / cpu
        recipe = {
            "model": str(model_dir), "stages": ["prune", "recover", "evaluate", "bench"],
            "prune": {"target": 0.25, "ffn_multiple": 64,
                      "calibration": {"source": "wikitext2", "n_samples": 8, "seq_len": 128}},
            "recover": {"method": "distill", "tokens": 128 * 8 * 4, "eval_every": 2,
                        "data": {"source": "self", "seq_len": 128, "held_out": 2}},
            "evaluate": {"ppl": ["self", "wikitext2"], "seq_len": 128, "window_every": 64, "device": "cuda"},
            "bench": {"device": "cuda", "prefill_batch": 1, "prefill_len": 64, "decode_batches": [1],
                      "decode_tokens": 8, "repeats": 1},
        }
        records = prunekit.run(recipe, Path(work) / "run")
        record["recipe_evaluate_figures"] = records["evaluate"]["figures"]
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("perplexity", "relative_difference", "recipe_evaluate_figures")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
