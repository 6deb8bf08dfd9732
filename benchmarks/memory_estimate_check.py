"""The pruning memory estimate (prunekit.models.memory.pruning_estimate, what `prunekit prune`
checks before loading) beside the peak memory that profile_prune.py measured: for each record,
the estimate made now from the record's model shape and settings, and the measured peak resident
memory less the process's resident memory before loading (the estimate counts what the job adds).

    python benchmarks/memory_estimate_check.py benchmarks/results/profile_cpu_*.json --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_prune import RANDOM_SHAPES  # noqa: E402

from prunekit.models.loading import load_skeleton, resolve_model_source  # noqa: E402
from prunekit.models.memory import pruning_estimate  # noqa: E402
from prunekit.models.structure import model_structure  # noqa: E402


def structure_of(model: str):
    shape = model.removesuffix(" (random weights)")
    if shape in RANDOM_SHAPES:
        from transformers import AutoConfig, AutoModelForCausalLM

        family, config = RANDOM_SHAPES[shape]
        with torch.device("meta"):
            return model_structure(AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config)))
    return model_structure(load_skeleton(resolve_model_source(model)))


def check(record: dict) -> dict:
    rows = int(record["calibration"].split()[1])
    seq_len = int(record["calibration"].split()[3].rstrip(","))
    estimate = pruning_estimate(structure_of(record["model"]), record["dtype"], gradients=True, batch_size=8,
                                seq_len=seq_len, n_samples=rows, cached_layers=1, device=record.get("device", "cpu"))
    measured = (record["memory"]["peak_rss_gib"] - record["memory"]["process_rss_before_load_gib"]) * 2**30
    return {"label": record["label"], "model": record["model"], "calibration": record["calibration"],
            "estimate_gib": round(estimate.total / 2**30, 3), "estimate": estimate.describe(),
            "measured_peak_over_start_gib": round(measured / 2**30, 3),
            "estimate_over_measured": round(estimate.total / measured, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [check(json.loads(Path(path).read_text())) for path in args.records]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
