"""Turn pruning-grid result files (benchmarks/pruning_grid.py) into the markdown tables of
BENCHMARKS.md.

    python benchmarks/grid_table.py benchmarks/results/grid_*.json
    python benchmarks/grid_table.py --tasks benchmarks/results/grid_obs_tasks.json   # zero-shot accuracy table
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

def repair_label(run: dict) -> str:
    """The compensation column: obs with its options, and block reconstruction where it ran (as pruning_grid prints it)."""
    label = str(run["compensation"]).replace("True", "one-shot").replace("False", "none")
    if label == "obs":
        label += f" ({run['channels_per_step']}/step, damping {run['damping']:g})"
    if run.get("reconstruct_steps"):
        label += f" + reconstruct {run['reconstruct_steps']} @ {run['reconstruct_lr']:g}"
    return label


PEERS = {0.2: "51.0 (LLM-Pruner, Taylor)", 0.35: "-", 0.5: "271.7 (LLM-Pruner, Taylor)"}


def task_table(paths: list[str]) -> int:
    """Zero-shot accuracy (acc_norm where the task reports it, else acc) of every run beside the dense model."""
    for path in paths:
        record = json.load(open(path))
        tasks = list(record["dense_tasks"])
        metric = {t: "acc_norm" if "acc_norm" in record["dense_tasks"][t] else "acc" for t in tasks}
        print("| removed | setting | WikiText-2 | " + " | ".join(f"{t} {metric[t]}" for t in tasks) + " | mean |")
        print("|" + "---|" * (4 + len(tasks)))

        def row(removed: str, setting: str, ppl: float, results: dict) -> None:
            values = [results[t][metric[t]] for t in tasks]
            print(f"| {removed} | {setting} | {ppl:.2f} | " + " | ".join(f"{v:.3f}" for v in values)
                  + f" | {sum(values) / len(values):.3f} |")

        row("0%", "dense", record["dense"]["perplexity"], record["dense_tasks"])
        for run in record["runs"]:
            row(f"{run['target']:.0%}", f"{run['criterion']}, {run['allocation']}, {','.join(run['structures'])}, "
                f"{repair_label(run)}", run["perplexity"], run["tasks"])
        n = {t: record["dense_tasks"][t]["n"] for t in tasks}
        print(f"\n- `{path}`: `{record['command']}` on {record['device']}, {record['date']}; examples per task: "
              + ", ".join(f"{t} {n[t]}" for t in tasks))
    return 0


def main(paths: list[str]) -> int:
    runs, meta = [], []
    for path in paths:
        record = json.load(open(path))
        meta.append((path, record))
        runs += record["runs"]
    # The same setting measured in two files keeps its latest measurement.
    table: dict[tuple, dict] = {}
    for run in runs:
        # Files written before `structures` was recorded used layers for block influence, else widths.
        default = ["layer"] if run["criterion"] == "block_influence" else ["channel", "head", "kv_group"]
        key = (run["criterion"], run["allocation"], ",".join(run.get("structures", default)), repair_label(run),
               run.get("steps", 1))
        table.setdefault(key, {})[run["target"]] = run
    ratios = sorted({r for rows in table.values() for r in rows})
    print("| criterion | allocation | removes | compensation | steps | " + " | ".join(f"{r:.0%}" for r in ratios)
          + " | scoring s | prune + compensate s | peak MiB |")
    print("|" + "---|" * (8 + len(ratios)))
    for key in sorted(table):
        rows = table[key]
        cells = [f"{rows[r]['perplexity']:,.1f}" if r in rows else "-" for r in ratios]
        any_run = next(iter(rows.values()))
        prune = " / ".join(f"{rows[r]['prune_seconds']:.1f}" if r in rows else "-" for r in ratios)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | " + " | ".join(cells)
              + f" | {any_run['score_seconds']:.1f} | {prune} | {any_run['peak_memory_mib']:,.0f} |")
    print()
    print("| removed | prunekit best (37 windows) | same, every window (592) | setting | best peer (same protocol) |")
    print("|---|---|---|---|---|")
    best_by_ratio = defaultdict(lambda: None)
    for key, rows in table.items():
        for ratio, run in rows.items():
            if best_by_ratio[ratio] is None or run["perplexity"] < best_by_ratio[ratio][1]["perplexity"]:
                best_by_ratio[ratio] = (key, run)
    for ratio in ratios:
        key, run = best_by_ratio[ratio]
        full = run.get("full_eval")
        print(f"| {ratio:.0%} | {run['perplexity']:.2f} | {full['perplexity']:.2f} | " if full else
              f"| {ratio:.0%} | {run['perplexity']:.2f} | not measured | ", end="")
        print(f"{key[0]}, {key[1]}, {key[2]}, {key[3]} compensation, {key[4]} step{'s' * (key[4] > 1)} "
              f"| {PEERS.get(ratio, '-')} |")
    print()
    for path, record in meta:
        print(f"- `{path}`: `{record['command']}` on {record['device']}, {record['date']}; "
              f"transformers {record['versions']['transformers']}, torch {record['versions']['torch']}; dense "
              f"{record['dense']['perplexity']}" + (f" (every window: {record['dense_full_eval']['perplexity']})"
                                                    if "dense_full_eval" in record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(task_table(sys.argv[2:]) if sys.argv[1:2] == ["--tasks"] else main(sys.argv[1:]))
