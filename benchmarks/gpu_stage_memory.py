"""What a recipe's stages leave on the GPU: free memory and reserved memory after each stage,
before and after the runner releases it, for a recipe whose prune, evaluate and bench stages run
on the GPU (issue: after the prune stage the process still held 64 GiB, and the next stage's
memory check saw too little free).

A random Llama of the given shape (default 1.1B: hidden 2048, 22 layers) with a byte-level
tokenizer; the calibration and evaluation text is synthetic (speed and memory do not depend on it).

    python benchmarks/gpu_stage_memory.py --out gpu_stage_memory.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

import prunekit
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions
from prunekit.runner import stages as run_module

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, **byte_vocab}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def gib(size: int) -> float:
    return round(size / 2**30, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_stage_memory.py measures what stages leave on a CUDA GPU; no GPU is visible here", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **SHAPES[args.shape])
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    text = " ".join(random.Random(0).choice(words) for _ in range(200_000))
    samples: list[dict] = []
    release = run_module.release_devices

    def measured_release() -> None:
        stage = len(samples)
        before = {"free_gib": gib(torch.cuda.mem_get_info()[0]), "reserved_gib": gib(torch.cuda.memory_reserved()),
                  "allocated_gib": gib(torch.cuda.memory_allocated())}
        release()
        after = {"free_gib": gib(torch.cuda.mem_get_info()[0]), "reserved_gib": gib(torch.cuda.memory_reserved()),
                 "allocated_gib": gib(torch.cuda.memory_allocated())}
        samples.append({"after_stage": stage, "before_release": before, "after_release": after})

    run_module.release_devices = measured_release
    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(), "versions": versions(), "shape": args.shape,
              "free_at_start_gib": gib(torch.cuda.mem_get_info()[0])}
    with tempfile.TemporaryDirectory(prefix="prunekit-stage-memory-") as work:
        work = Path(work)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        prunekit.save_model(model.cpu(), tokenizer, work / "dense")
        del model
        torch.cuda.empty_cache()
        (work / "text.txt").write_text(text)
        calibration = {"source": str(work / "text.txt"), "n_samples": 32, "seq_len": 1024}
        recipe = {"model": str(work / "dense"), "dtype": "bfloat16", "stages": ["prune", "evaluate", "bench"],
                  "prune": {"target": 0.25, "criterion": "taylor", "device": "cuda", "batch_size": 4,
                            "calibration": calibration},
                  "evaluate": {"ppl": [str(work / "text.txt")], "seq_len": 1024, "window_every": 4,
                               "dtype": "bfloat16", "device": "cuda"},
                  "bench": {"device": "cuda", "prefill_batch": 4, "prefill_len": 512, "decode_batches": [1],
                            "decode_tokens": 16, "repeats": 2}}
        records = prunekit.run(recipe, work / "run")
        record["stages"] = [{"stage": name, "seconds": records[name]["seconds"], **sample}
                            for name, sample in zip(recipe["stages"], samples)]
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    for row in record["stages"]:
        print(f"{row['stage']:9s} reserved {row['before_release']['reserved_gib']:7.2f} -> "
              f"{row['after_release']['reserved_gib']:6.2f} GiB; free {row['before_release']['free_gib']:7.2f} -> "
              f"{row['after_release']['free_gib']:7.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
