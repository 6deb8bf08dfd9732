"""Time and peak GPU memory of scoring and pruning a Llama-3-8B-shaped model (issue 8).

The model has Llama-3-8B's shape (32 layers, hidden 4096, 32 query / 8 KV heads of 128, FFN
14336, vocab 128256) and random bf16 weights; the calibration set is random token ids, 128 rows
of 2048 (speed does not depend on the values). Each measurement builds its own model, runs, and
frees everything before the next; one that fails is recorded with its error and the run goes on.
The JSON record is rewritten after every measurement, so a run cut short keeps what it finished.

    python benchmarks/gpu_scale.py --out benchmarks/results/gpu_scale.json
    python benchmarks/gpu_scale.py --only activation_sequential,layer_by_layer_sequential --out ...
    python benchmarks/gpu_scale.py --device cpu --shape tiny --out /tmp/gpu_scale.json   # smoke test
    python benchmarks/gpu_scale.py --markdown RECORD.json [RECORD.json ...]   # the tables of GPU_BENCHMARKS.md

Sensitivity cost is linear in the rows (every removal runs every row through the rest of the
model), so it is measured on fewer rows (--sensitivity-rows) and extrapolated to --rows.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from random_llama import LLAMA3_8B, random_weights

SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
TARGET = 0.35


@dataclass(frozen=True)
class Measurement:
    name: str
    minutes: float          # expected on one H200 at the default sizes, model build included
    run: Callable[[argparse.Namespace, torch.Tensor], dict]
    default: bool = True    # part of the run without --only


# ----------------------------------------------------------------------------- model and data


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace, home: str):
    """The shaped model with random bf16 weights in `home` memory, built on the meta device and
    filled on the work device (a CPU fill of 8B values takes minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(8192, args.seq_len), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16)  # on meta: no memory, so the weights are never allocated in float32
    random_weights(model, home, fill_device=args.device)
    return model.eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- measurements


def _settings(args, **overrides):
    from prunekit.pipeline import CalibrationSettings, PruneSettings

    # global allocation, as when the records were made (the default allocation is log_increase since)
    fields = dict(target=TARGET, criterion="activation", allocation="global", compensation="none", batch_size=args.batch_size,
                  device=args.device, prune=("channel", "head", "kv_group"),
                  calibration=CalibrationSettings(n_samples=args.rows, seq_len=args.seq_len))
    return PruneSettings(**{**fields, **overrides})


def _whole_model_prune(args, ids, compensation: str) -> dict:
    """Activation scoring, plan and cut at TARGET, whole model on the device, phase by phase
    (the functions prune_loaded calls, timed apart)."""
    from prunekit.compensate import compensate_sequential
    from prunekit.models.structure import model_structure
    from prunekit.plan.planner import make_plan
    from prunekit.prune.surgery import apply_plan
    from prunekit.score import collect_layer_stats, score_model

    model = build_model(args, home=args.device)
    _reset_peak(args.device)
    settings = _settings(args, compensation=compensation)
    phases = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        _sync(args.device)
        now = time.perf_counter()
        phases[name] = round(now - clock, 2)
        clock = now
        print(f"    {name}: {phases[name]} s", flush=True)

    stats = collect_layer_stats(model, ids, batch_size=args.batch_size, progress=False)
    lap("statistics_s")
    scores = score_model(model, "activation", ids, stats=stats, batch_size=args.batch_size, progress=False)
    lap("scores_s")
    before = model_structure(model)
    plan = make_plan(before, scores, settings.planner_settings(), comparable=False)
    lap("plan_s")
    if compensation == "sequential":
        compensate_sequential(model, plan, ids, batch_size=args.batch_size, progress=False)
        lap("sequential_compensation_s")
    after = apply_plan(model, plan)
    lap("surgery_s")
    return {"phases": phases, "seconds": round(sum(phases.values()), 2),
            "params_before": before.total_params, "params_after": after.total_params}


def measure_activation(args, ids) -> dict:
    return _whole_model_prune(args, ids, "none")


def measure_activation_sequential(args, ids) -> dict:
    return _whole_model_prune(args, ids, "sequential")


def measure_taylor(args, ids) -> dict:
    from prunekit.score import score_model

    model = build_model(args, home=args.device)
    _reset_peak(args.device)
    started = time.perf_counter()
    score_model(model, "taylor", ids, batch_size=args.taylor_batch_size, progress=False)
    _sync(args.device)
    return {"seconds": round(time.perf_counter() - started, 2), "batch_size": args.taylor_batch_size}


def _sensitivity(args, ids, kinds: tuple[str, ...], rows: int, fine_tokens: int = 0) -> dict:
    from prunekit.score import score_model

    model = build_model(args, home=args.device)
    _reset_peak(args.device)
    rows = min(rows, len(ids))
    started = time.perf_counter()
    scores = score_model(model, "sensitivity", ids[:rows], batch_size=args.batch_size, progress=False, kinds=kinds,
                         removals_per_pass=args.removals_per_pass, fine_tokens=fine_tokens)
    _sync(args.device)
    seconds = time.perf_counter() - started
    return {"kinds": list(kinds), "rows": rows, "rows_per_kind": scores.meta["rows"], "fine_tokens": fine_tokens,
            "seconds": round(seconds, 2), "cost": scores.meta["cost"],
            # every removal runs every row through the rest of the model: linear in the rows
            f"seconds_extrapolated_to_{args.rows}_rows": round(seconds * args.rows / rows, 1)}


def measure_sensitivity_layers(args, ids) -> dict:
    return _sensitivity(args, ids, ("layer",), args.sensitivity_rows[0])


def measure_sensitivity_sublayers(args, ids) -> dict:
    return _sensitivity(args, ids, ("attention", "mlp"), args.sensitivity_rows[1])


def measure_sensitivity_heads(args, ids) -> dict:
    return _sensitivity(args, ids, ("head",), args.sensitivity_rows[2])


def measure_sensitivity_coarse(args, ids) -> dict:
    """Layers and sublayers, every calibration row: measured, not extrapolated."""
    return _sensitivity(args, ids, ("layer", "attention", "mlp"), args.rows)


def measure_sensitivity_fine(args, ids) -> dict:
    """KV groups and heads as the default analysis measures them: on the first rows holding
    prunekit's default fine_tokens."""
    from prunekit.score.sensitivity import DEFAULT_FINE_TOKENS

    return _sensitivity(args, ids, ("kv_group", "head"), args.rows, fine_tokens=DEFAULT_FINE_TOKENS)


def _layer_by_layer(args, ids, compensation: str, cap_gib: float) -> dict:
    """prune_loaded end to end in layer-by-layer mode: the model in CPU memory, device memory capped."""
    from prunekit.models.memory import layer_by_layer_estimate
    from prunekit.models.structure import model_structure
    from prunekit.pipeline import prune_loaded

    model = build_model(args, home="cpu")
    size = model_bytes(model)
    settings = _settings(args, compensation=compensation, layer_by_layer=True)
    estimate = layer_by_layer_estimate(model_structure(model), "bfloat16", n_samples=args.rows, seq_len=args.seq_len,
                                       batch_size=args.batch_size, compensation=compensation)
    cap = None
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the fill's temporaries: the cap must start from an empty device
        cap = int(cap_gib * 2**30)
        index = torch.device(args.device).index or 0  # the cap takes an indexed device, not plain "cuda"
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    _reset_peak(args.device)
    try:
        started = time.perf_counter()
        record = prune_loaded(model, None, settings, progress=False, calibration=(ids, None))
        _sync(args.device)
        seconds = time.perf_counter() - started
    finally:
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    peak = torch.cuda.max_memory_allocated(args.device) if args.device.startswith("cuda") else None
    return {"seconds": round(seconds, 2), "compensation": compensation, "model_bytes": size,
            "model_gib": round(size / 2**30, 2), "cap_gib": cap_gib if cap is not None else None,
            "estimate_gib": round(estimate.total / 2**30, 2),
            "cap_bytes": cap, "estimate_bytes": estimate.total, "estimate": estimate.describe(),
            "peak_over_model_size": round(peak / size, 3) if peak is not None else None,
            "weights_stayed_in_cpu_memory": on_cpu, "removed": record["removed"],
            "params_after": record["params"]["after"]}


def measure_layer_by_layer(args, ids) -> dict:
    return _layer_by_layer(args, ids, "none", args.cap_gib)


def measure_layer_by_layer_sequential(args, ids) -> dict:
    return _layer_by_layer(args, ids, "sequential", args.cap_sequential_gib)


MEASUREMENTS = [
    Measurement("activation", 1.0, measure_activation),
    Measurement("taylor", 1.5, measure_taylor),
    Measurement("sensitivity_layers", 0.8, measure_sensitivity_layers),
    Measurement("sensitivity_sublayers", 0.8, measure_sensitivity_sublayers),
    Measurement("sensitivity_heads", 1.0, measure_sensitivity_heads),
    Measurement("layer_by_layer", 2.0, measure_layer_by_layer),
    Measurement("sensitivity_coarse", 8.5, measure_sensitivity_coarse, default=False),
    Measurement("sensitivity_fine", 6.5, measure_sensitivity_fine, default=False),
    Measurement("activation_sequential", 2.5, measure_activation_sequential, default=False),
    Measurement("layer_by_layer_sequential", 3.0, measure_layer_by_layer_sequential, default=False),
]


# ----------------------------------------------------------------------------- running


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class _TooLong(Exception):
    pass


def _on_alarm(signum, frame):
    raise _TooLong


def run_one(measurement: Measurement, args, ids) -> dict:
    """One measurement, isolated: its own model, its own peak, its error recorded instead of raised."""
    _free(args.device)
    _reset_peak(args.device)
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.max_seconds_each)
    try:
        result = measurement.run(args, ids)
        result["status"] = "ok"
    except _TooLong:
        result = {"status": "error", "error": f"stopped after --max-seconds-each {args.max_seconds_each} s"}
    except Exception as error:  # noqa: BLE001  (one failure must not lose the other measurements)
        result = {"status": "error", "error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
                  "traceback": traceback.format_exc()[-2000:]}
    finally:
        signal.alarm(0)
    if args.device.startswith("cuda"):
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(args.device)
        result["peak_gpu_gib"] = round(result["peak_gpu_bytes"] / 2**30, 2)
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(args.device) / 2**30, 2)
    # the process's peak so far: the measurement's own when it runs alone (--only NAME)
    result["peak_cpu_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["wall_seconds_with_build"] = round(time.perf_counter() - started, 1)
    _free(args.device)
    return result


def full_sensitivity(measured: dict, rows: int, shape: str) -> dict | None:
    """The default analysis (layer, attention, mlp, kv_group, head) at --rows: measured as its
    coarse and fine halves where both ran, else extrapolated from the three row-subset
    measurements (KV groups cost what heads do per removal, and a layer has a quarter as many
    groups as heads in this shape, 8 of 32)."""
    halves = [measured.get(name, {}) for name in ("sensitivity_coarse", "sensitivity_fine")]
    if all(half.get("status") == "ok" for half in halves):
        seconds = halves[0]["seconds"] + halves[1]["seconds"]
        return {"rows": rows, "seconds": round(seconds), "minutes": round(seconds / 60, 1),
                "formula": f"measured: layers and sublayers on all {rows} rows, KV groups and heads on "
                           f"{halves[1]['rows_per_kind']['head']} rows (fine_tokens {halves[1]['fine_tokens']})"}
    parts = [measured.get(name, {}) for name in ("sensitivity_layers", "sensitivity_sublayers", "sensitivity_heads")]
    if not all(part.get("status") == "ok" for part in parts):
        return None
    key = f"seconds_extrapolated_to_{rows}_rows"
    groups_per_head = SHAPES[shape]["num_key_value_heads"] / SHAPES[shape]["num_attention_heads"]
    seconds = parts[0][key] + parts[1][key] + parts[2][key] * (1 + groups_per_head)
    return {"rows": rows, "seconds": round(seconds), "minutes": round(seconds / 60, 1),
            "formula": "layers + sublayers + heads x (1 + kv_groups/heads), each extrapolated linearly in rows"}


def markdown(records: list[dict]) -> str:
    """One row per measurement that finished, from one or more JSON records (a later record's
    measurement replaces an earlier one of the same name)."""
    rows: dict[str, dict] = {}
    for record in records:
        for name, result in record["measurements"].items():
            if result.get("status") == "ok":
                rows[name] = {**result, "record_date": record["date"]}
    lines = ["| measurement | what runs | seconds | peak GPU memory | note |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        what = {"activation": "activation statistics + scores + plan + surgery, 35%",
                "taylor": f"Taylor scores (gradients), {r.get('batch_size', '?')} rows per backward",
                "activation_sequential": "activation + sequential compensation + surgery, 35%",
                "layer_by_layer": "activation + plan + surgery, 35%, weights in CPU memory",
                "layer_by_layer_sequential": "the same with sequential compensation"}.get(name)
        note = ""
        if name.startswith("sensitivity_"):
            used = sorted(set((r.get("rows_per_kind") or {}).values()) or {r["rows"]})
            what = (f"sensitivity of {', '.join(r['kinds'])} ({r['cost']['removals']} removals) on "
                    f"{'/'.join(map(str, used))} rows")
            rows_full = records[0]["calibration"]["rows"]
            note = (f"{r['seconds'] / 60:.1f} min, as run" if r["rows"] == rows_full else
                    f"{r[f'seconds_extrapolated_to_{rows_full}_rows'] / 60:.1f} min at {rows_full} rows (linear)")
        if r.get("cap_gib"):
            note = (f"GPU capped at {r['cap_gib']:g} GiB; model {r['model_gib']:.1f} GiB; peak = "
                    f"{r['peak_over_model_size']:.2f} x model; estimate {r['estimate_gib']:.1f} GiB")
        if "phases" in r:
            note = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r["phases"].items())
        lines.append(f"| {name} | {what} | {r['seconds']:.0f} | {r['peak_gpu_gib']:.1f} GiB | {note} |")
    full = full_sensitivity(rows, records[0]["calibration"]["rows"], records[0]["shape"])
    if full:
        lines += ["", f"Full sensitivity analysis (layers, sublayers, heads and KV groups) at {full['rows']} rows: "
                      f"{full['minutes']:.1f} min ({full['formula']})."]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [m.name for m in MEASUREMENTS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON record (rewritten after each measurement)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated measurements: {', '.join(names)} (default: the first six)")
    parser.add_argument("--rows", type=int, default=None, help="calibration rows (default 128; tiny: 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; tiny: 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--taylor-batch-size", type=int, default=4, help="rows per backward pass (default 4)")
    parser.add_argument("--removals-per-pass", type=int, default=4)
    parser.add_argument("--sensitivity-rows", default="32,16,1",
                        help="rows for sensitivity layers, sublayers, heads (default 32,16,1; extrapolated to --rows)")
    parser.add_argument("--cap-gib", type=float, default=6.0, help="GPU memory cap of layer_by_layer (default 6)")
    parser.add_argument("--cap-sequential-gib", type=float, default=10.0,
                        help="GPU memory cap of layer_by_layer_sequential (default 10)")
    parser.add_argument("--max-seconds-each", type=int, default=420,
                        help="stop a measurement after this long and go on (default 420)")
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    args.rows = args.rows or (8 if tiny else 128)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    args.sensitivity_rows = [int(r) for r in args.sensitivity_rows.split(",")]
    if len(args.sensitivity_rows) != 3:
        parser.error("--sensitivity-rows takes three numbers: layers, sublayers, heads")
    selected = args.only.split(",") if args.only else [m.name for m in MEASUREMENTS if m.default]
    unknown = sorted(set(selected) - set(names))
    if unknown:
        parser.error(f"unknown measurements {unknown}; choose from {', '.join(names)}")
    args.selected = [m for m in MEASUREMENTS if m.name in selected]
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--markdown":
        print(markdown([json.loads(Path(p).read_text()) for p in sys.argv[2:]]))
        return 0
    args = _parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_scale.py: error: no CUDA GPU is visible to torch on this machine; run it on a GPU machine, or "
              "smoke-test it on the CPU with --device cpu --shape tiny", file=sys.stderr)
        return 2
    from prunekit.export.huggingface import versions

    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.rows, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "versions": versions(), "device": args.device, "shape": args.shape, "config": shape, "dtype": "bfloat16",
        "calibration": {"rows": args.rows, "seq_len": args.seq_len, "tokens": args.rows * args.seq_len,
                        "values": "random token ids"},
        "target": TARGET, "batch_size": args.batch_size,
        "issue_8_targets_seconds": {"activation scoring plus surgery": 180, "full sensitivity analysis": 900},
        "measurements": {},
    }
    expected = sum(m.minutes for m in args.selected)
    print(f"gpu_scale: {', '.join(m.name for m in args.selected)}; expected ~{expected:.1f} min on one H200 at the "
          f"default sizes", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for measurement in args.selected:
        print(f"[{measurement.name}] expected ~{measurement.minutes} min", flush=True)
        result = {"expected_minutes": measurement.minutes, **run_one(measurement, args, ids)}
        record["measurements"][measurement.name] = result
        out.write_text(json.dumps(record, indent=1) + "\n")
        summary = {k: v for k, v in result.items() if k in ("status", "seconds", "peak_gpu_gib", "error",
                                                             "wall_seconds_with_build", "peak_over_model_size")}
        print(f"[{measurement.name}] {summary}", flush=True)
    record["sensitivity_full_extrapolated"] = full_sensitivity(record["measurements"], args.rows, args.shape)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"sensitivity, default kinds, extrapolated: {record['sensitivity_full_extrapolated']}", flush=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
