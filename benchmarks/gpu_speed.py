"""Speed of pruned models at real sizes on a GPU, dense and pruned side by side in one run.

A Llama-3-8B-shaped model with random bf16 weights (speed does not depend on weight values) is
pruned by prunekit's own planner and surgery (random scores: only the shapes matter here) four
ways -- width only (uniform, hardware-aligned), depth only (layers), attention sublayers only,
mixed -- at several targets, plus the aligned widths made unaligned (+N FFN channels) to show
what planning's rounding buys. Per model, interleaved with the dense model:

- prefill tokens/s at batch x length (SDPA, eager; optionally also under torch.compile), the
  logits of the last position only, as `generate` does;
- decode tokens/s at batch 1 and a large batch with a static KV cache, each step replayed from a
  captured CUDA graph (bandwidth-bound, the fair comparison), and eager for reference;
- peak GPU memory;
- the ideal speedups: FLOPs per token for prefill, bytes read per decode step for decode.

A width sweep times one FFN's GEMMs across widths, for the rounding rule of the planner.

    python benchmarks/gpu_speed.py --out gpu_speed.json            # on a CUDA machine
    python benchmarks/gpu_speed.py --shape tiny --device cpu --out /tmp/s.json   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import warnings
from torch import nn

from random_llama import LLAMA3_8B, random_weights

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")

SHAPES = {
    "llama3-8b": dict(LLAMA3_8B, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=1024),
}

# way -> structures the planner may remove, and how it allocates them
WAYS = {
    # Minitron-like width: FFN channels and at most a quarter of the KV groups (with their heads)
    "width": dict(prune=("channel", "kv_group"), allocation="uniform", limits={"kv_group": 0.25}),
    "ffn": dict(prune=("channel",), allocation="uniform"),
    "depth": dict(prune=("layer",), allocation="global"),
    "attention": dict(prune=("attention",), allocation="global"),
    "mixed": dict(prune=("channel", "head", "kv_group", "attention", "mlp", "layer"), allocation="global"),
}


def log(*parts) -> None:
    print(*parts, flush=True)


# ----------------------------------------------------------------------------- models


def llama_config(shape: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def skeleton(config) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(copy.deepcopy(config))  # surgery rewrites the config it is given


def plan_for(config, way: str, target: float, ffn_multiple: int, seed: int):
    """prunekit's plan for this way and target, from random scores on the meta skeleton."""
    from prunekit.models.structure import model_structure
    from prunekit.plan.planner import PlannerSettings, make_plan, max_removable_fraction

    structure = model_structure(skeleton(config))
    settings = PlannerSettings(target=target, ffn_multiple=ffn_multiple, **WAYS[way])
    reachable = max_removable_fraction(structure, settings)
    if target > reachable:
        return None, reachable
    return make_plan(structure, random_scores(structure, seed), settings, comparable=False), reachable


def random_scores(structure, seed: int):
    """Uniform random scores of the right shapes (the weights are random too, so any criterion would be)."""
    from prunekit.score.scores import Scores

    generator = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.rand(n, generator=generator, dtype=torch.float64)  # noqa: E731
    values = {kind: [] for kind in ("layer", "attention", "mlp", "kv_group", "head", "channel")}
    for shape in structure.layers:
        for kind in ("layer", "attention", "mlp"):
            values[kind].append(rand(()))
        values["kv_group"].append(rand(shape.num_key_value_heads))
        values["head"].append(rand(shape.num_attention_heads))
        values["channel"].append(rand(shape.intermediate_size))
    return Scores("random", values, {"seed": seed, "unit": "random"})


def unaligned(plan, extra: int, intermediate_size: int):
    """The same plan with `extra` more FFN channels kept in every layer that was cut."""
    from dataclasses import replace as dc_replace

    from prunekit.plan.plan import Plan

    layers = {}
    for index, layer_plan in plan.layers.items():
        if layer_plan.keep_channels is not None:
            kept = set(layer_plan.keep_channels)
            more = [c for c in range(intermediate_size) if c not in kept][:extra]
            layer_plan = dc_replace(layer_plan, keep_channels=tuple(sorted(kept | set(more))))
        layers[index] = layer_plan
    return Plan(layers=layers, drop_layers=plan.drop_layers, model=plan.model, meta=dict(plan.meta, unaligned=extra))


def materialize(config, plan, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build on meta, cut by the plan there (shapes only), then allocate and fill with random weights."""
    from prunekit.prune.surgery import apply_plan

    model = skeleton(config)
    if plan is not None:
        apply_plan(model, plan)
    random_weights(model, device, seed=seed)
    return model.to(dtype).eval()


def describe(model: nn.Module) -> dict:
    from prunekit.models.structure import model_structure

    structure = model_structure(model)
    layers = structure.layers
    return {
        "layers": len(layers),
        "params": structure.total_params,
        "non_embedding_params": structure.non_embedding_params,
        "query_heads": sorted({s.num_attention_heads for s in layers}),
        "kv_heads": sorted({s.num_key_value_heads for s in layers}),
        "ffn_widths": sorted({s.intermediate_size for s in layers}),
        "attention_sublayers": sum(1 for s in layers if s.num_attention_heads),
        "mlp_sublayers": sum(1 for s in layers if s.intermediate_size),
    }


def ideal_costs(model: nn.Module, seq_len: int, context: int, batch: int, bytes_per_value: int = 2) -> dict:
    """Prefill FLOPs per token (last-position logits only, as generate does) and bytes read per
    decode step at `batch` rows attending to `context` cached tokens."""
    from prunekit.models.structure import model_structure

    structure = model_structure(model)
    layer_flops = structure.flops_per_token(seq_len) - 2 * structure.vocab_size * structure.hidden_size
    head_weights = structure.vocab_size * structure.hidden_size
    layer_weights = structure.non_embedding_params  # norms included; a rounding error
    kv = structure.kv_cache_bytes_per_token(bytes_per_value) * context
    return {
        "prefill_flops_per_token": layer_flops + 2 * head_weights / seq_len,
        "decode_bytes_per_step": (layer_weights + head_weights) * bytes_per_value + batch * kv,
    }


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Prefill:
    model: nn.Module
    ids: torch.Tensor
    forward: object

    def __call__(self):
        with torch.no_grad():
            self.forward(input_ids=self.ids, use_cache=False, logits_to_keep=1)


class GraphDecode:
    """One decode step with a static KV cache, captured once as a CUDA graph and replayed.

    The prompt fills the cache eagerly; the captured step writes position `context` each replay,
    so every replay reads the same cache length: a fixed-cost step, which is what is timed."""

    def __init__(self, model: nn.Module, batch: int, context: int, device: torch.device, use_graph: bool,
                 max_steps: int, seed: int = 0):
        from transformers import StaticCache

        self.model, self.device, self.use_graph, self.context = model, device, use_graph, context
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
        self.cache = StaticCache(config=model.config, max_cache_len=context + max_steps + 8)
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=self.cache, cache_position=torch.arange(context, device=device),
                  use_cache=True, logits_to_keep=1)
        self.ids = torch.randint(0, vocab, (batch, 1), generator=generator).to(device)
        self.position = torch.tensor([context], device=device)
        self.position_ids = self.position.expand(batch, 1).contiguous()
        self.graph = None
        if use_graph:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the graph, as CUDA graphs require
                    self.rewind()
                    self._step()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.rewind()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def rewind(self) -> None:
        """Back to `context` cached tokens. Recent transformers keep a write counter per layer (a
        device tensor the step advances in place); older ones write where cache_position says."""
        for layer in getattr(self.cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(self.context)

    def _step(self):
        with torch.no_grad():
            return self.model(input_ids=self.ids, past_key_values=self.cache, cache_position=self.position,
                              position_ids=self.position_ids, use_cache=True, logits_to_keep=1).logits

    def run(self, steps: int) -> None:
        self.rewind()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    def release(self) -> None:
        self.graph = None
        self.cache = None


def interleaved(calls: dict[str, object], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call, alternating between the calls so that drift hits all alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call, device))
    return times


def summary(seconds: list[float], work: float) -> dict:
    rates = sorted(work / s for s in seconds)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "seconds": seconds}


def peak_memory(call, device: torch.device) -> float | None:
    """GiB allocated at the peak of `call` above what was allocated before it (the dense model
    and its caches stay resident beside a pruned one, so the absolute peak would count them)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


# ----------------------------------------------------------------------------- measurements


def measure_pair(dense: dict, pruned_model: nn.Module, args, device: torch.device) -> dict:
    """Prefill and decode of the pruned model, each interleaved with the dense model's."""
    batch, length = args.prefill
    ids = torch.randint(0, pruned_model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    pruned = {"prefill": Prefill(pruned_model, ids, pruned_model)}
    result = {"prefill": {}, "decode": {}, "memory_gib": {}}
    times = interleaved({"dense": dense["prefill"], "pruned": pruned["prefill"]}, args.repeats, device)
    for name in times:
        result["prefill"][name] = summary(times[name], batch * length)
    result["memory_gib"]["prefill"] = peak_memory(pruned["prefill"], device)
    for decode_batch in args.decode_batches:
        for mode in args.decode_modes:
            key = f"b{decode_batch}_{mode}"
            if key not in dense["decode"]:
                continue
            try:
                step = GraphDecode(pruned_model, decode_batch, args.context, device, use_graph=mode == "graph",
                                   max_steps=args.decode_steps)
            except Exception as error:  # noqa: BLE001  (recorded, the other measurements go on)
                result["decode"][key] = {"error": f"{type(error).__name__}: {error}"[:500]}
                continue
            steps = args.decode_steps if mode == "graph" else max(4, args.decode_steps // 4)
            times = interleaved({"dense": lambda s=steps: dense["decode"][key].run(s),
                                 "pruned": lambda s=steps: step.run(s)}, args.repeats, device)
            result["decode"][key] = {name: summary(times[name], decode_batch * steps) for name in times}
            result["memory_gib"][f"decode_{key}"] = peak_memory(lambda: step.run(1), device)
            step.release()
    return result


def width_sweep(config, widths: list[int], rows: list[int], device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    """Time of one SwiGLU FFN (gate, up, down GEMMs) at each width, per row count."""
    hidden = config.hidden_size
    out = []
    for m in rows:
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        for width in widths:
            gate_up = torch.randn(2 * width, hidden, device=device, dtype=dtype) * 0.02
            down = torch.randn(hidden, width, device=device, dtype=dtype) * 0.02

            def ffn():
                h = torch.nn.functional.linear(x, gate_up)
                g, u = h.chunk(2, dim=-1)
                torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down)

            inner = 20 if m > 256 else 200
            for _ in range(3):
                ffn()
            seconds = [timed(lambda: [ffn() for _ in range(inner)], device) / inner for _ in range(repeats)]
            flops = 2 * m * hidden * 3 * width
            best = min(seconds)
            out.append({"rows": m, "width": width, "seconds": best, "tflops": flops / best / 1e12})
        del x
    return out


def versions(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "host_cpu": platform.processor() or platform.machine()}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--targets", default="0.2,0.35,0.5")
    parser.add_argument("--ways", default="ffn,width,depth,attention,mixed")
    parser.add_argument("--attention-targets", default="0.1,0.19",
                        help="attention sublayers hold under a fifth of an 8B model's parameters, so they get their own targets")
    parser.add_argument("--ffn-multiple", type=int, default=128, help="the planner's FFN width multiple (hardware alignment)")
    parser.add_argument("--unaligned", type=int, default=37, help="also time the ffn plans with this many more FFN channels (0: skip)")
    parser.add_argument("--prefill", default="8x2048")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the timed decode steps")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--decode-modes", default="graph,eager")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time prefill under torch.compile (dense and the ffn plans)")
    parser.add_argument("--sweep", default="13312:13824:8", help="FFN widths start:stop:step for the width sweep ('' to skip)")
    parser.add_argument("--sweep-rows", default="16384,64,1")
    parser.add_argument("--plans-only", action="store_true", help="print the shapes of every plan and stop (no GPU needed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON record to write")
    parser.add_argument("--markdown", nargs="+", metavar="RECORD", help="print the tables of these JSON records and stop")
    args = parser.parse_args(argv)
    if not args.markdown and not args.out:
        parser.error("--out is required (or --markdown RECORD ... to print tables)")
    args.targets = [float(t) for t in args.targets.split(",") if t]
    args.attention_targets = [float(t) for t in args.attention_targets.split(",") if t]
    args.ways = [w for w in args.ways.split(",") if w]
    unknown = set(args.ways) - set(WAYS)
    if unknown:
        parser.error(f"unknown ways {sorted(unknown)}; choose from {sorted(WAYS)}")
    args.prefill = tuple(int(v) for v in args.prefill.split("x"))
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    args.decode_modes = [m for m in args.decode_modes.split(",") if m]
    return args


def variants(config, args) -> list[tuple[str, str, float, object, float]]:
    """(name, way, target, plan, reachable) for every model to time."""
    out = []
    for way in args.ways:
        targets = args.attention_targets if way == "attention" else args.targets
        for target in targets:
            plan, reachable = plan_for(config, way, target, args.ffn_multiple, args.seed)
            name = f"{way}-{round(target * 100)}"
            if plan is None:
                log(f"{name}: out of reach (at most {reachable:.3f} removable this way); skipped")
                continue
            out.append((name, way, target, plan, reachable))
            if way == "ffn" and args.unaligned:
                out.append((f"{name}+{args.unaligned}", "ffn-unaligned", target,
                            unaligned(plan, args.unaligned, config.intermediate_size), reachable))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(Path(p).read_text()) for p in args.markdown]))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.plans_only:
        print("gpu_speed: no CUDA GPU is visible here; run it on a GPU machine, or pass --device cpu --shape tiny "
              "for a smoke test", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.shape != "tiny" and not args.plans_only:
        print("gpu_speed: an 8B-shaped model on the CPU would take hours; pass --shape tiny with --device cpu", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    config = llama_config(args.shape)
    started = time.time()
    planned = variants(config, args)
    record = {"command": " ".join(sys.argv), "shape": args.shape, "config": SHAPES[args.shape], "settings": {
        k: v for k, v in vars(args).items() if k not in ("out",)}, "versions": versions(device), "models": {}}
    for name, way, target, plan, reachable in planned:
        shapes = describe(materialize_meta(config, plan))
        log(f"{name}: {shapes}")
        record["models"][name] = {"way": way, "target": target, "reachable": reachable,
                                  "achieved": plan.meta.get("achieved"), "shape": shapes}
    if args.plans_only:
        Path(args.out).write_text(json.dumps(record, indent=1))
        return 0

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    batch, length = args.prefill
    decode_batch_max = max(args.decode_batches)
    dense_model = materialize(config, None, device, dtype, args.seed)
    record["dense"] = {"shape": describe(dense_model)}
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    dense = {"prefill": Prefill(dense_model, ids, dense_model), "decode": {}}
    modes = [m for m in args.decode_modes if m != "graph" or device.type == "cuda"]
    args.decode_modes = modes
    for decode_batch in args.decode_batches:
        for mode in modes:
            key = f"b{decode_batch}_{mode}"
            try:
                dense["decode"][key] = GraphDecode(dense_model, decode_batch, args.context, device,
                                                   use_graph=mode == "graph", max_steps=args.decode_steps)
            except Exception as error:  # noqa: BLE001
                record["dense"].setdefault("decode_errors", {})[key] = f"{type(error).__name__}: {error}"[:500]
                log(f"dense decode {key} failed: {record['dense']['decode_errors'][key]}")
    record["dense"]["memory_gib"] = {"prefill": peak_memory(dense["prefill"], device),
                                     "resident_after_setup": torch.cuda.memory_allocated(device) / 2**30
                                     if device.type == "cuda" else None}
    record["dense"]["ideal"] = {f"b{b}": ideal_costs(dense_model, length, args.context, b) for b in args.decode_batches}
    log(f"dense built and captured in {time.time() - started:.0f} s; decode modes {sorted(dense['decode'])}")

    for name, way, target, plan, reachable in planned:
        t0 = time.time()
        entry = record["models"][name]
        try:
            model = materialize(config, plan, device, dtype, args.seed)
            entry["ideal"] = {f"b{b}": ideal_costs(model, length, args.context, b) for b in args.decode_batches}
            entry.update(measure_pair(dense, model, args, device))
            entry["speedup"] = speedups(record["dense"], entry)
            log(f"{name}: {json.dumps(entry['speedup'])} ({time.time() - t0:.0f} s)")
        except Exception as error:  # noqa: BLE001  (recorded; the other models go on)
            entry["error"] = f"{type(error).__name__}: {error}"[:1000]
            log(f"{name}: failed: {entry['error']}")
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(record, indent=1))

    if args.compile and device.type == "cuda":
        compiled_prefill(config, planned, dense_model, ids, args, device, dtype, record)
    for step in dense["decode"].values():
        step.release()
    dense_model = dense = None
    gc.collect()
    if args.sweep:
        start, stop, step = (int(v) for v in args.sweep.split(":"))
        widths = sorted(set(range(start, stop + 1, step)) | {start + 37})
        rows = [int(r) for r in args.sweep_rows.split(",")]
        record["width_sweep"] = width_sweep(config, widths, rows, device, dtype, repeats=3)
        log(f"width sweep: {len(record['width_sweep'])} points")
    record["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(record, indent=1))
    log(f"done in {record['seconds']} s -> {args.out}")
    return 0


def materialize_meta(config, plan) -> nn.Module:
    from prunekit.prune.surgery import apply_plan

    model = skeleton(config)
    apply_plan(model, plan)
    return model


def speedups(dense: dict, entry: dict) -> dict:
    """Measured speedup (pruned rate / dense rate, medians of the interleaved runs) beside the ideal."""
    out = {}
    prefill = entry["prefill"]
    out["prefill"] = {"measured": prefill["pruned"]["median"] / prefill["dense"]["median"],
                      "ideal": dense["ideal"]["b1"]["prefill_flops_per_token"] / entry["ideal"]["b1"]["prefill_flops_per_token"]}
    for key, value in entry["decode"].items():
        if "error" in value:
            continue
        b = key.split("_")[0]
        out[f"decode_{key}"] = {"measured": value["pruned"]["median"] / value["dense"]["median"],
                                "ideal": dense["ideal"][b]["decode_bytes_per_step"] / entry["ideal"][b]["decode_bytes_per_step"]}
    for value in out.values():
        value["of_ideal"] = value["measured"] / value["ideal"]
    return out


def compiled_prefill(config, planned, dense_model, ids, args, device, dtype, record: dict) -> None:
    """Prefill under torch.compile for the dense model and the aligned/unaligned FFN plans, into
    record["compile"], written out after each model (a run cut short keeps what it measured)."""
    out = record["compile"] = {}
    batch, length = args.prefill
    dense_call = Prefill(dense_model, ids, torch.compile(dense_model))
    for name, way, target, plan, _ in planned:
        if not way.startswith("ffn"):
            continue
        t0 = time.time()
        try:
            model = materialize(config, plan, device, dtype, args.seed)
            call = Prefill(model, ids, torch.compile(model))
            times = interleaved({"dense": dense_call, "pruned": call}, args.repeats, device, warmup=2)
            out[name] = {k: summary(v, batch * length) for k, v in times.items()}
            out[name]["speedup"] = out[name]["pruned"]["median"] / out[name]["dense"]["median"]
            log(f"compiled {name}: {out[name]['speedup']:.3f}, tokens/s dense {out[name]['dense']['median']:,.0f} "
                f"pruned {out[name]['pruned']['median']:,.0f} ({time.time() - t0:.0f} s)")
        except Exception as error:  # noqa: BLE001
            out[name] = {"error": f"{type(error).__name__}: {error}"[:1000]}
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- tables


def _shape_text(shape: dict, dense: dict) -> str:
    parts = []
    if shape["layers"] != dense["layers"]:
        parts.append(f"{shape['layers']} layers")
    if shape["attention_sublayers"] != shape["layers"]:
        parts.append(f"{shape['attention_sublayers']} attention")
    if shape["mlp_sublayers"] != shape["layers"]:
        parts.append(f"{shape['mlp_sublayers']} MLP")
    heads = [h for h in shape["query_heads"] if h]
    kv = [h for h in shape["kv_heads"] if h]
    if heads and (heads != dense["query_heads"] or kv != dense["kv_heads"]):
        parts.append(f"heads {'/'.join(map(str, heads))}, KV {'/'.join(map(str, kv))}")
    widths = [w for w in shape["ffn_widths"] if w]
    if widths != dense["ffn_widths"]:
        parts.append(f"FFN {'/'.join(map(str, widths))}")
    return ", ".join(parts) or "dense"


def markdown(records: list[dict]) -> str:
    """One row per pruned model: measured speedup / ideal speedup (share of ideal), per metric."""
    lines = []
    for record in records:
        dense = record["dense"]
        metrics = ["prefill"] + [k for k in next(iter(m for m in record["models"].values() if "speedup" in m))["speedup"]
                                 if k != "prefill"]
        lines.append(f"`{record['command'].replace('/root/out/', '')}` "
                     f"({record['versions'].get('gpu', 'cpu')}, torch {record['versions']['torch']}, "
                     f"transformers {record['versions']['transformers']}, {record['versions']['date']})")
        lines.append("")
        labels = {"prefill": "prefill", "decode_b1_graph": "decode b1 (graph)", "decode_b1_eager": "decode b1 (eager)",
                  "decode_b64_graph": "decode b64 (graph)", "decode_b64_eager": "decode b64 (eager)"}
        lines.append("| model | removed (non-emb.) | shape | " + " | ".join(labels.get(m, m) for m in metrics) + " |")
        lines.append("|---|---|---|" + "---|" * len(metrics))
        for name, model in record["models"].items():
            if "speedup" not in model:
                if "error" in model:
                    lines.append(f"| {name} | | failed: {model['error'][:80]} |" + " |" * len(metrics))
                continue  # the run ended before this model
            removed = 1 - model["shape"]["non_embedding_params"] / dense["shape"]["non_embedding_params"]
            cells = []
            for metric in metrics:
                value = model["speedup"].get(metric)
                cells.append("" if value is None else
                             f"{value['measured']:.2f}x / {value['ideal']:.2f}x (**{value['of_ideal']:.2f}**)")
            lines.append(f"| {name} | {removed:.1%} | {_shape_text(model['shape'], dense['shape'])} | " + " | ".join(cells) + " |")
        lines.append("")
        first = next(m for m in record["models"].values() if "prefill" in m)
        rates = [f"prefill {first['prefill']['dense']['median']:,.0f} tok/s"]
        for key, value in first["decode"].items():
            if "dense" in value:
                rates.append(f"decode {key.replace('_', ' ')} {value['dense']['median']:,.0f} tok/s")
        lines.append("Dense model, medians in the first pair: " + "; ".join(rates) + ".")
        lines.append("")
        if record.get("width_sweep"):
            lines.append("FFN GEMM throughput by width (bf16, one SwiGLU FFN of hidden 4096: gate, up and down "
                         "products), TFLOP/s, median (min-max) over the widths of each kind:")
            lines.append("")
            sweep = record["width_sweep"]
            rows = sorted({p["rows"] for p in sweep}, reverse=True)
            lines.append("| widths | " + " | ".join(f"{r} rows" for r in rows) + " |")
            lines.append("|---|" + "---|" * len(rows))
            for label, keep in (("multiples of 16", lambda w: w % 16 == 0), ("not a multiple of 16", lambda w: w % 16 != 0)):
                widths = sorted({p["width"] for p in sweep if keep(p["width"])})
                if not widths:
                    continue
                cells = []
                for r in rows:
                    values = sorted(p["tflops"] for p in sweep if p["rows"] == r and keep(p["width"]))
                    cells.append(f"{statistics.median(values):.1f} ({values[0]:.1f}-{values[-1]:.1f})" if len(values) > 1
                                 else f"{values[0]:.1f}")
                names = f"{widths[0]}..{widths[-1]} ({len(widths)})" if len(widths) > 1 else str(widths[0])
                lines.append(f"| {label}: {names} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
