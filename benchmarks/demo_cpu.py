"""The demo exactly as `make demo` runs it (`prunekit demo --out DIR`: recipes/demo.yaml, prune,
distil, evaluate, bench, report on the embedded SmolLM2-135M), timed from the shell, and kept as the
record the README's demo block is generated from.

    PRUNEKIT_DATA_DIR=/work/shared/data python benchmarks/demo_cpu.py --run   # writes benchmarks/results/demo_cpu/
    python benchmarks/demo_cpu.py --markdown                                   # the README's printed block, from it

The record folder holds what the run wrote except the models: records/<stage>.json (settings, seconds,
figures), eval.json, eval_dense.json, bench.json, recipe.yaml, report.md and the report's figures,
and run.json (the command, wall time, date, machine, versions and what the command printed).
`tests/test_demo.py` (slow) runs the same command and compares its figures with this record
within the tolerances it states.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "demo_cpu"
STAGES = ("prune", "recover", "evaluate", "bench", "report")
# what the run leaves beside the models (which are not kept: hundreds of MB)
KEPT = ("records", "eval.json", "eval_dense.json", "bench.json", "recipe.yaml", "report.md", "figures")


def git_commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" plus uncommitted changes" if dirty else "")


def versions() -> dict:
    import torch
    import transformers

    import prunekit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "prunekit": getattr(prunekit, "__version__", None)}


def run_demo(run_dir: Path, record: Path) -> dict:
    """`prunekit demo --out run_dir` in a fresh process, as `make demo` calls it; its outputs but the
    models copied to `record`."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    prunekit = Path(sys.executable).with_name("prunekit")
    command = [str(prunekit), "demo", "--out", str(run_dir)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if record.exists():
        shutil.rmtree(record)
    record.mkdir(parents=True)
    for name in KEPT:
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, record / name)
        elif source.is_file():
            shutil.copy2(source, record / name)
    printed = [line.replace(str(run_dir), "runs/demo") for line in done.stdout.splitlines()]
    summary = {
        "what": "the demo as `make demo` runs it (prunekit demo: recipes/demo.yaml), timed from the shell",
        "command": f"PRUNEKIT_DATA_DIR={os.environ.get('PRUNEKIT_DATA_DIR', '')} python benchmarks/demo_cpu.py --run"
                   f"  (runs: prunekit demo --out {run_dir.name})",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "checkout": git_commit(),
        "versions": versions(),
        "data_dir": bool(os.environ.get("PRUNEKIT_DATA_DIR")),
        "load_average_at_start": round(load_before, 2),
        "wall_seconds": round(wall, 1),
        "wall_minutes": round(wall / 60, 1),
        "stage_seconds": {stage: json.loads((record / "records" / f"{stage}.json").read_text())["seconds"]
                          for stage in STAGES},
        "printed": printed,
    }
    (record / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def demo_block(record: Path = RECORD) -> str:
    """What `make demo` printed at its end, as the README shows it: the stage times and the
    before/after table, generated from the record (the runner's own format_summary)."""
    from prunekit.runner.stages import format_summary

    records = {stage: json.loads((record / "records" / f"{stage}.json").read_text()) for stage in STAGES}
    lines = [f"[{stage}] done in {records[stage]['seconds']:.0f} s" for stage in STAGES]
    lines += [format_summary(records), "report: runs/demo/report.md"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the demo and write the record")
    parser.add_argument("--markdown", action="store_true", help="print the README's demo block from the record")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo_record"))
    parser.add_argument("--record", default=str(RECORD))
    args = parser.parse_args()
    if args.run:
        summary = run_demo(Path(args.run_dir), Path(args.record))
        print(json.dumps({k: v for k, v in summary.items() if k != "printed"}, indent=1))
    if args.markdown or not args.run:
        print(demo_block(Path(args.record)))


if __name__ == "__main__":
    main()
