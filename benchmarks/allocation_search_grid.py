"""Issue 20: allocation search against global allocation on SmolLM2-135M, the grid's protocol.

Calibration: C4 128 x 512, seed 0, as the default prune; the search (as `prunekit prune
--allocation search` does) draws 16 rows more, on which alone it judges candidates by KL
divergence from the dense model, and never sees WikiText-2. Each ratio's plans are compensated as
the default does (sequential least squares on the 128 rows), cut, and evaluated on WikiText-2
(`wiki.test.raw`, 512-token windows, every 16th, fp32), optionally with zero-shot tasks.

Rows of the record per ratio:
    global-128  the default: Taylor on the 128 rows, global allocation (the search's start)
    search      the searched allocation from the same scores
(`--held-apart inside` holds the last 16 of the 128 rows apart instead, as the first records did:
then `global-112` is global allocation from the search's own 112-row scores.)
and `agreement`: for the start, the result and random far mutants, the fitness the search
measures (KL, one-shot candidates) beside the WikiText-2 perplexity of the same candidate.

    python benchmarks/allocation_search_grid.py --ratios 0.35 --generations 20 --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.compensate import compensate_sequential
from prunekit.data import calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.tasks import evaluate_tasks
from prunekit.export.huggingface import versions
from prunekit.plan.planner import PlannerSettings, make_plan, plan_at, removed_fraction, search_space
from prunekit.plan.search import SearchSettings, mutate
from prunekit.prune.allocation_search import CandidateLayers, dense_log_probs, mean_kl, search_allocation
from prunekit.score import collect_layer_stats, score_model


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731
    ra, rb = rank(a), rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--generations", type=int, default=SearchSettings.generations)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--offspring", type=int, default=SearchSettings.offspring)
    parser.add_argument("--max-mutations", type=int, default=SearchSettings.max_mutations)
    parser.add_argument("--held-out-rows", type=int, default=SearchSettings.held_out_rows)
    parser.add_argument("--held-apart", choices=("extra", "inside"), default="extra",
                        help="fitness rows drawn beyond the 128 (extra, what prunekit does) or the last of them (inside)")
    parser.add_argument("--agreement", type=int, default=0, help="random far mutants for the fitness/perplexity check")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks of the final models, e.g. piqa,arc_easy,hellaswag")
    parser.add_argument("--task-limit", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    dense.to(device)
    held = args.held_out_rows
    extra = held if args.held_apart == "extra" else 0
    drawn = calibration_tokens("c4", tokenizer, n_samples=128 + extra, seq_len=512, seed=0, data_dir=args.data_dir)
    ids = drawn[:128]
    build_ids, held_ids = drawn[:-held], drawn[-held:]
    structure = prunekit.model_structure(dense)

    def wikitext(model) -> float:
        return round(perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                                window_every=args.eval_every, protocol="raw", batch_size=args.batch_size,
                                data_dir=args.data_dir, progress=False).perplexity, 3)

    def tasks(model) -> dict | None:
        if not args.tasks:
            return None
        return evaluate_tasks(model, tokenizer, args.tasks.split(","), data_dir=args.data_dir, limit=args.task_limit,
                              batch_size=32)

    record = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "versions": versions(),
              "protocol": {"calibration": f"c4 128x512 seed 0; search: scores and candidates on rows 0-{len(build_ids) - 1}, "
                                          f"fitness on rows {len(build_ids)}-{len(drawn) - 1}",
                           "eval": f"wikitext2 raw test, 512-token windows, every {args.eval_every}th, fp32",
                           "compensation": "sequential (the default) on all 128 rows"},
              "dense": {"wikitext2": wikitext(dense), "tasks": tasks(dense)}, "runs": []}
    print(f"dense: {record['dense']}", flush=True)

    t0 = time.perf_counter()
    scores_all = score_model(dense, "taylor", ids, batch_size=args.batch_size, progress=args.progress)
    scores_build = (scores_all if len(build_ids) == len(ids)
                    else score_model(dense, "taylor", build_ids, batch_size=args.batch_size, progress=args.progress))
    record["scoring_seconds"] = round(time.perf_counter() - t0, 1)

    def final(plan) -> dict:
        model = copy.deepcopy(dense)
        compensate_sequential(model, plan, ids, batch_size=args.batch_size, progress=False)
        after = prunekit.apply_plan(model, plan)
        result = {"removed": round(removed_fraction(structure, after, "non-embedding"), 5),
                  "wikitext2": wikitext(model), "tasks": tasks(model),
                  "ffn_widths": [s.intermediate_size for s in after.layers],
                  "heads": [s.num_attention_heads for s in after.layers]}
        del model
        return result

    for ratio in [float(r) for r in args.ratios.split(",")]:
        settings = PlannerSettings(target=ratio, allocation="search")
        search = SearchSettings(generations=args.generations, minutes=args.minutes, offspring=args.offspring,
                                max_mutations=args.max_mutations, held_out_rows=held)
        t0 = time.perf_counter()
        plan, search_record = search_allocation(dense, scores_build, settings, search, build_ids, held_ids,
                                                batch_size=args.batch_size, device=args.device, progress=args.progress)
        search_seconds = round(time.perf_counter() - t0, 1)
        space = search_space(structure, scores_build, settings)
        run = {"ratio": ratio, "search_seconds": search_seconds, "search": search_record,
               "global-128": final(make_plan(structure, scores_all, PlannerSettings(target=ratio)))}
        if scores_build is not scores_all:
            run["global-112"] = final(plan_at(space, space.start, structure, scores_build, settings))
        run["search_result"] = final(plan)
        print(f"{ratio}: global-128 {run['global-128']['wikitext2']}  global-112 {run.get('global-112', {}).get('wikitext2')}  "
              f"search {run['search_result']['wikitext2']}  (KL {search_record['start_fitness']:.4f} -> "
              f"{search_record['fitness']:.4f}, {len(search_record['trace']) - 1} generations, {search_seconds} s)",
              flush=True)
        if args.agreement:
            stats = collect_layer_stats(dense, build_ids, batch_size=args.batch_size, with_gram=True, progress=False)
            candidates = CandidateLayers(dense, space, structure, scores_build, settings, stats, ridge=1e-3,
                                         comparable=True)
            reference = dense_log_probs(dense, held_ids, 4)
            rng = random.Random(7)
            points = [tuple(space.start), tuple(search_record["positions"])]
            points += [mutate(space.start, space, rng, 12) for _ in range(args.agreement)]
            rows = []
            for positions in points:
                with candidates.assembled(positions) as candidate:
                    rows.append({"positions": list(positions), "kl": mean_kl(candidate, held_ids, reference, 4),
                                 "wikitext2": wikitext(candidate)})
            run["agreement"] = {"points": rows, "spearman": round(spearman([r["kl"] for r in rows],
                                                                          [r["wikitext2"] for r in rows]), 3)}
            print(f"  agreement over {len(rows)} candidates: Spearman {run['agreement']['spearman']}", flush=True)
            del candidates, stats, reference
        record["runs"].append(run)
        out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
