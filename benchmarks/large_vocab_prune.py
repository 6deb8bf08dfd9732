"""`prunekit prune` of random models with large vocabularies, from the shell, as a user runs it:
a Gemma-3-270M-shaped model (262,144-token vocabulary) and issue 18's tiny 4-layer model with a
128,256-token vocabulary (hidden 256). Each model is built with random weights, saved as a
directory with SmolLM2's tokenizer (its ids lie inside both vocabularies; memory and time do not
depend on the weights' values), then pruned by `prunekit prune DIR --target T --out OUT EXTRA`.
The record keeps the wall time, the prune step's time, the peak memory prunekit measured beside
the estimate it admitted the job on (what it prints), and the child process's peak resident set
(getrusage) as a second measure of the same peak.

    python benchmarks/large_vocab_prune.py --json benchmarks/results/large_vocab_prune_cpu.json
    python benchmarks/large_vocab_prune.py --cases tiny128k-taylor-bf16-one-batch --json ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from profile_prune import RANDOM_SHAPES  # noqa: E402

SHAPES = {
    "gemma3-270m": RANDOM_SHAPES["gemma3-270m"],
    # issue 18: "a tiny 4-layer model with a 128,256-token vocabulary (hidden 256, random weights)"
    "tiny128k": ("llama", dict(vocab_size=128_256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2)),
}
# name -> (shape, extra `prunekit prune` arguments)
CASES = {
    "gemma3-270m-default": ("gemma3-270m", []),
    "tiny128k-taylor-bf16-one-batch": ("tiny128k", ["--dtype", "bfloat16", "--criterion", "taylor",
                                                    "--calib-samples", "4"]),
    "tiny128k-taylor-bf16": ("tiny128k", ["--dtype", "bfloat16", "--criterion", "taylor"]),
    "tiny128k-default-bf16": ("tiny128k", ["--dtype", "bfloat16"]),
}


def save_random_model(shape: str, directory: Path, tokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    family, config = SHAPES[shape]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model


def run_case(name: str, model_dir: Path, work: Path, target: float) -> dict:
    shape, extra = CASES[name]
    out = work / f"pruned-{name}"
    command = [sys.executable, "-m", "prunekit", "prune", str(model_dir), "--target", str(target), "--out", str(out),
               "--force", *extra]
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: {done.stderr[-3000:]}")
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    pruning = json.loads((out / "prunekit.json").read_text())["pruning"]
    memory = pruning["memory"]
    printed = next((line.strip() for line in done.stdout.splitlines() if line.strip().startswith("memory:")), None)
    gib = lambda size: round(size / 2**30, 3)  # noqa: E731
    return {
        "case": name, "shape": shape, "vocab_size": SHAPES[shape][1]["vocab_size"],
        "command": " ".join(["prunekit", *command[3:]]).replace(str(out), "OUT").replace(str(model_dir), "MODEL"),
        "wall_seconds": round(wall, 1),
        "prune_step_seconds": pruning["steps"][0]["seconds"],
        "load_average_at_start": round(load_before, 2),
        "settings": {k: pruning["settings"].get(k) for k in ("criterion", "allocation", "prune", "compensation")},
        "calibration_rows": pruning["settings"].get("calibration", {}).get("n_samples"),
        "removed_non_embedding": pruning["removed"]["non-embedding"],
        "memory": {"peak_gib": gib(memory["peak_bytes"]), "estimate_gib": gib(memory["estimate_bytes"]),
                   "estimate_over_peak": round(memory["estimate_bytes"] / memory["peak_bytes"], 3),
                   "peak_since_process_start": memory["peak_since_process_start"],
                   # the largest child so far: this one when it is the largest
                   "child_max_rss_gib": gib(child_peak) if child_peak > before * 1024 else None,
                   "printed": printed},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if not os.environ.get("PRUNEKIT_DATA_DIR"):
        parser.error("set PRUNEKIT_DATA_DIR to the data directory (C4)")
    from prunekit.models.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        models = {}
        for name in cases:
            shape = CASES[name][0]
            if shape not in models:
                models[shape] = Path(work) / shape
                save_random_model(shape, models[shape], tokenizer)
            runs.append(run_case(name, models[shape], Path(work), args.target))
            print(json.dumps(runs[-1]), flush=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record = {
        "what": "prunekit prune of random models with large vocabularies from the shell (saved as directories with "
                "SmolLM2's tokenizer), timed; peak memory as prunekit measured it (VmHWM of the process from before "
                "the load) beside the estimate it admitted the job on",
        "command": " ".join(["python", "benchmarks/large_vocab_prune.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "checkout": head.stdout.strip(),
        "shapes": {name: {"family": family, **config} for name, (family, config) in SHAPES.items()},
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
