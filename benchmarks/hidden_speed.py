"""Issue 21: CPU speed, in torch and in llama.cpp, of hidden-pruned SmolLM2-135M beside the
default FFN-pruned one at the same fractions of *total* parameters, and beside the dense model.

The models are those of benchmarks/hidden_recovery.py (`build`): `hidden` (residual channels
alone, a uniform width, so the stock Llama family) and `ffn` (`prunekit prune --target T --basis
total`, per-layer FFN widths) at each ratio. They are built from --calib-samples C4 rows (16 by
default, not 128): speed depends on the shapes alone, and neither setting's shapes depend on the
calibration data (the hidden width follows from the target; log_increase gives each layer its FFN
width from the target, and OBS only picks which channels go). The record keeps every model's
parameter count and widths, to compare with the quality records'.

- torch: `benchmark_speed` (what `prunekit bench MODEL --baseline DENSE` runs) of each pruned model
  interleaved with the dense model in the same process: bf16, eager, --threads threads, prefill
  of 8 x 512 random tokens and greedy decode of 64 tokens after a 128-token prompt (batch 1 by
  default), --repeats repeats after one warm-up; measured speedups beside the ideal one (FLOPs).
- llama.cpp: every model written by `write_gguf` in each of --quants, plus the dense model written
  as `deci` (the per-layer architecture the FFN-pruned models need; gguf_quant.py's control, so
  that the FFN models' figures are not mistaken for a difference between llama.cpp's `llama` and
  `deci` graphs), all loaded together and timed in --rounds interleaved rounds by gguf_quant.py's
  `measure_speed` (llama-cpp-python, 2 threads, pp512 on a fresh cache, tg128 greedy).
Both phases record the CPU share other processes took meanwhile. Run it alone on the machine:

    flock /tmp/prunekit-cpu.lock python benchmarks/hidden_speed.py --data-dir /work/shared/data \\
        --out benchmarks/results/hidden_speed_cpu.json
    python benchmarks/hidden_speed.py --markdown benchmarks/results/hidden_speed_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_baseline import OtherCpu  # noqa: E402
from gguf_quant import THREADS, _cpu_model, _export_as_deci, _llama_cpp_has_amx, _versions, _windows, measure_speed  # noqa: E402
from hidden_recovery import build, units  # noqa: E402

SETTINGS = ("hidden", "ffn")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5", help="fractions of total parameters")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"any of {','.join(SETTINGS)}")
    parser.add_argument("--multiple", type=int, default=64, help="hidden and FFN moves")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--quants", default="f16,q4_k_m", help="GGUF types timed in llama.cpp")
    parser.add_argument("--decode-batches", default="1")
    parser.add_argument("--repeats", type=int, default=5, help="torch: timed repeats after one warm-up")
    parser.add_argument("--rounds", type=int, default=5, help="llama.cpp: interleaved rounds")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (llama.cpp uses 2)")
    parser.add_argument("--work", default="runs/hidden_speed", help="where the .gguf files are written")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, metavar="RECORD",
                        help="print BENCHMARKS.md's table of RECORD, figure references included, and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        return args
    if args.out is None:
        parser.error("--out is required")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",")]
        args.decode_batches = tuple(int(b) for b in args.decode_batches.split(","))
    except ValueError:
        parser.error("--ratios takes fractions such as 0.2,0.35 and --decode-batches sizes such as 1,16")
    if not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios are fractions of the total parameters, between 0 and 1; got {args.ratios}")
    args.settings = args.settings.split(",")
    if unknown := sorted(set(args.settings) - set(SETTINGS)):
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    from prunekit.export.gguf import QUANT_TYPES

    args.quants = args.quants.split(",")
    if unknown := sorted(set(args.quants) - set(QUANT_TYPES)):
        parser.error(f"unknown GGUF types {unknown}; choose from {list(QUANT_TYPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text()), args.markdown.name))
        return 0
    import llama_cpp  # noqa: F401  (fail now, not after the pruning)

    import prunekit
    from prunekit.data import calibration_tokens
    from prunekit.evaluate.speed import benchmark_speed
    from prunekit.export.files import atomic_write_text
    from prunekit.export.gguf import write_gguf
    from prunekit.plan.planner import removed_fraction
    from prunekit.score import score_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dense, tokenizer = prunekit.load(args.model, dtype="float32")
    structure = prunekit.model_structure(dense)
    ids = calibration_tokens("c4", tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                             data_dir=args.data_dir)
    how = SimpleNamespace(multiple=args.multiple)
    scores = score_model(dense, "activation", ids, progress=False) if "hidden" in args.settings else None
    models = {"dense": dense}
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.date.today().isoformat(),
              "machine": {"cpu": _cpu_model(), "torch_threads": args.threads, "llama_cpp_threads": THREADS,
                          "llama_cpp_extra_buffers": not _llama_cpp_has_amx()},
              "versions": _versions(), "models": {"dense": {"params": structure.total_params, "units": units(dense)}}}
    for ratio in args.ratios:
        for setting in args.settings:
            name = f"{setting}-{round(100 * ratio)}"
            began = time.perf_counter()
            models[name], done = build(setting, dense, tokenizer, ids, scores, ratio, how)
            after = prunekit.model_structure(models[name])
            record["models"][name] = {"setting": setting, "ratio": ratio, "how": done, "params": after.total_params,
                                      "removed_total": round(removed_fraction(structure, after, "total"), 5),
                                      "units": units(models[name]), "prune_seconds": round(time.perf_counter() - began, 1)}
            print(f"{name}: {after.total_params:,} parameters ({record['models'][name]['prune_seconds']} s)", flush=True)
    record["prune_seconds"] = round(time.perf_counter() - started, 1)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")

    # llama.cpp first: it needs only the files, and the torch phase casts copies to bf16
    work = Path(args.work)
    files = {}
    for name, model in models.items():
        for quant in args.quants:
            exported = write_gguf(model, tokenizer, work / f"{name}.{quant}.gguf", quant=quant, force=True)
            files[(name, quant)] = exported.path
            record["models"][name].setdefault("gguf", {})[quant] = {"arch": exported.arch, "bytes": exported.bytes}
    if any(g["arch"] != "llama" for m in record["models"].values() for g in m["gguf"].values()):
        # some model is written in the per-layer architecture: time the dense one written so too
        control = _export_as_deci(dense, tokenizer, work / "dense-as-deci.f16.gguf")
        files[("dense-as-deci", "f16")] = control.path
        record["models"]["dense-as-deci"] = {"gguf": {"f16": {"arch": control.arch, "bytes": control.bytes}}}
    prompt = _windows(tokenizer, args.data_dir, 16)[1][0]
    samples, other = measure_speed(files, prompt, args.rounds)
    record["llama_cpp"] = {"protocol": f"llama-cpp-python Llama.eval, {THREADS} threads, pp{len(prompt)} on a fresh "
                                       f"cache, tg128 greedy from an empty cache, median of {args.rounds} interleaved rounds",
                           "other_cpu_share": round(other, 4)}
    for (name, quant), measured in samples.items():
        entry = record["models"][name]["gguf"][quant]
        for metric, values in measured.items():
            entry[f"{metric}_tok_s"] = {"median": round(statistics.median(values), 2), "all": [round(v, 2) for v in values]}
    save()
    print(f"llama.cpp done; other processes took {other:.1%} of the CPU", flush=True)

    meter = OtherCpu()
    for name, model in models.items():
        if name == "dense":
            continue
        result = benchmark_speed(copy.deepcopy(model), baseline=copy.deepcopy(dense), device="cpu", dtype="bfloat16",
                                 decode_batches=args.decode_batches, repeats=args.repeats)
        record["models"][name]["torch"] = result.to_dict()
        print(f"{name}: torch speedup " + ", ".join(f"{m} {s.median:.2f}x" for m, s in result.speedup.items())
              + f" (ideal {result.ideal_speedup:.2f}x)", flush=True)
        save()
    record["torch_other_cpu_share"] = round(meter.share(), 4)
    record["seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(markdown(record, args.out.name))
    return 0


def markdown(record: dict, name: str) -> str:
    """BENCHMARKS.md's table of a record: each model's speed and its ratio to the dense model's,
    every figure with its docs-check reference to `name`."""
    models = record["models"]
    first_key = next(key for key, m in models.items() if "torch" in m)
    first = models[first_key]
    batches = first["torch"]["settings"]["decode_batches"]
    quants = list(models["dense"]["gguf"])
    head = ["model", "removed (total)", "hidden", "FFN channels", "params", "torch prefill tok/s"]
    head += [f"torch decode tok/s (batch {b})" for b in batches]
    for quant in quants:
        head += [f"llama.cpp {quant} pp512 tok/s", f"llama.cpp {quant} tg128 tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in models.items():
        if key == "dense-as-deci":
            continue
        at = f"{name}#models/{key}"
        u = m["units"]
        cells = [key, "-" if key == "dense" else f"{100 * m['ratio']:g}% ({100 * m['removed_total']:.1f}%)",
                 str(u["hidden"]), f"{u['ffn_channels']:,}", f"{m['params'] / 1e6:.1f}M"]
        refs = [] if key == "dense" else [f"{100 * m['ratio']:g}@-", f"{100 * m['removed_total']:.1f}@100*{{{at}/removed_total}}"]
        refs += [f"{u['hidden']}@{at}/units/hidden", f"{u['ffn_channels']:,}@{at}/units/ffn_channels"]
        metrics = ["prefill_tokens_per_s"] + [f"decode_tokens_per_s_batch{b}" for b in batches]
        for metric in metrics:
            if key == "dense":  # the dense figure of the first pair; every pair measured it again
                value = first["torch"]["baseline"]["timings"][metric]["median"]
                cells.append(f"{value:,.1f}")
                refs.append(f"{value:,.1f}@{name}#models/{first_key}/torch/baseline/timings/{metric}/median")
                continue
            value = m["torch"]["model"]["timings"][metric]["median"]
            ratio = m["torch"]["speedup"][metric]["median"]
            cells.append(f"{value:,.1f} ({ratio:.2f}x)")
            refs += [f"{value:,.1f}@{at}/torch/model/timings/{metric}/median",
                     f"{ratio:.2f}@{at}/torch/speedup/{metric}/median"]
        for quant in quants:
            for metric in ("prompt", "generation"):
                value = m["gguf"][quant][f"{metric}_tok_s"]["median"]
                base = models["dense"]["gguf"][quant][f"{metric}_tok_s"]["median"]
                pointer = f"{at}/gguf/{quant}/{metric}_tok_s/median"
                if key == "dense":
                    cells.append(f"{value:,.0f}")
                    refs.append(f"{value:,.0f}@{pointer}")
                else:
                    dense_pointer = f"{name}#models/dense/gguf/{quant}/{metric}_tok_s/median"
                    cells.append(f"{value:,.0f} ({value / base:.2f}x)")
                    refs += [f"{value:,.0f}@{pointer}", f"{value / base:.2f}@{{{pointer}}}/{{{dense_pointer}}}"]
        lines.append("| " + " | ".join(cells) + " | <!-- fig " + "; ".join(refs) + " -->")
    control = models.get("dense-as-deci")
    if control:
        parts, refs = [], []
        for metric, label in (("prompt", "pp512"), ("generation", "tg128")):
            value = control["gguf"]["f16"][f"{metric}_tok_s"]["median"]
            base = models["dense"]["gguf"]["f16"][f"{metric}_tok_s"]["median"]
            pointer = f"{name}#models/dense-as-deci/gguf/f16/{metric}_tok_s/median"
            parts.append(f"{label} {value:,.0f} ({value / base:.2f}x)")
            refs += [f"{value:,.0f}@{pointer}",
                     f"{value / base:.2f}@{{{pointer}}}/{{{name}#models/dense/gguf/f16/{metric}_tok_s/median}}"]
        lines += ["", "Control: the dense model written as `deci` (the FFN-pruned models' GGUF architecture), f16: "
                  + ", ".join(parts) + ". <!-- fig " + "; ".join(refs) + " -->"]
    shares = [record["llama_cpp"]["other_cpu_share"], record.get("torch_other_cpu_share", 0.0)]
    lines += ["", f"Other processes took at most {100 * max(shares):.1f}% of the CPU during the timings. "
                  f"<!-- fig {100 * max(shares):.1f}@100*max({{{name}#llama_cpp/other_cpu_share}}, "
                  f"{{{name}#torch_other_cpu_share}}) -->", "", f"`{record['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
