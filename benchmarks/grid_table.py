"""Turn pruning-grid result files (benchmarks/pruning_grid.py) into the markdown tables of
BENCHMARKS.md.

    python benchmarks/grid_table.py benchmarks/results/grid_*.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

PEERS = {0.2: "51.0 (LLM-Pruner, Taylor)", 0.35: "-", 0.5: "271.7 (LLM-Pruner, Taylor)"}


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
        key = (run["criterion"], run["allocation"], ",".join(run.get("structures", default)),
               str(run["compensation"]).replace("True", "one-shot").replace("False", "none"), run.get("steps", 1))
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
    sys.exit(main(sys.argv[1:]))
