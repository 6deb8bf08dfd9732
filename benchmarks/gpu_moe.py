"""Mixtures of experts on a GPU (issue 23): a Qwen3-30B-A3B-shaped and a Mixtral-8x7B-shaped model
with random bf16 weights, dense and with 25% and 50% of the routed experts removed, in one run.

Each shape is built from its transformers config on the meta device and filled with random bf16
weights on the GPU (speed and memory do not depend on the values). prunekit's planner removes
experts with uniform allocation (every MoE layer keeps the same count, so the result is the stock
family) from random expert scores: which experts go does not change speed, only how many. Surgery
then prunes the model in place (one layer's experts of workspace, no second copy): dense, then 25%,
then 50% of the original count removed, each measured before the next cut. Per model:

- memory: the bytes of the parameters, allocated GPU memory with the model resident, and the peak
  during prefill and decode (absolute and above the resident model);
- prefill tokens/s at batch x length (no cache, last-position logits only, as `generate` does);
- decode tokens/s at batch 1 and 16, eager with a DynamicCache after a `--context`-token prompt
  (the default experts kernel of transformers, `grouped_mm` on a GPU); `--graph` adds static-cache
  steps replayed from a CUDA graph (benchmarks/gpu_speed.py's GraphDecode) where capture works;
- ideals beside the measurements: removing experts leaves top-k, so the FLOPs a token runs through
  barely change (only the router rows); a decode step reads the experts its batch routes to, about
  E (1 - (1 - k/E)^B) per layer for B rows under uniform routing.

`--narrow F` then also removes F of every remaining expert's channels (prunekit's `expert_channel`
move, uniform, widths a multiple of `--width-multiple`) and measures that model too: narrower
experts cut the FLOPs of the top-k experts a token runs, which whole-expert removal does not.

Mixtral-8x7B in bf16 (93 GB) does not fit an 80 GB H100: `--mixtral-layers` (default 16 of its 32)
builds the first N layers, and the record says so; `--qwen-layers` likewise (default all 48).
The JSON record is written after every measured model, so a killed run keeps what it had.

    PYTHONPATH=src:benchmarks python benchmarks/gpu_moe.py --out gpu_moe.json        # on a CUDA machine
    PYTHONPATH=src:benchmarks python benchmarks/gpu_moe.py --narrow 0.5 --out gpu_moe.json   # and narrowed experts
    PYTHONPATH=src:benchmarks python benchmarks/gpu_moe.py --device cpu --tiny --out /tmp/moe.json  # smoke test
    python benchmarks/gpu_moe.py --markdown benchmarks/results/gpu_moe.json   # GPU_BENCHMARKS.md's tables, from the record
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
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, when run without PYTHONPATH=benchmarks
from gpu_speed import synchronize, timed  # noqa: E402
from random_llama import random_weights  # noqa: E402

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")

# The published configs' shapes (transformers config keys), without weights.
QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6,
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
MIXTRAL_8X7B = dict(
    model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
    rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
)
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B}
# --tiny: the same families at toy sizes, for a CPU smoke test of every code path.
TINY = {
    "qwen3-30b-a3b": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                          num_experts_per_tok=4, max_position_embeddings=512),
    "mixtral-8x7b": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_local_experts=8, max_position_embeddings=512),
}
TINY_LAYERS = 2


def log(*parts) -> None:
    print(*parts, flush=True)


def versions(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "host_cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- models


def shape_config(shape: str, layers: int | None, tiny: bool):
    from transformers import AutoConfig

    keys = dict(SHAPES[shape])
    if tiny:
        keys.update(TINY[shape])
    model_type = keys.pop("model_type")
    if layers:
        keys["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **keys)
    config._attn_implementation = "sdpa"
    return config


def build(config, device: torch.device, seed: int) -> nn.Module:
    """The model on the meta device, then allocated on `device` in bf16 and filled at random."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    random_weights(model, device, seed=seed)
    # the rotary inverse frequencies stay float32 (random_weights rebuilds them), as in a loaded model
    return model.eval()


def moe_layers(structure) -> list[int]:
    return [i for i, s in enumerate(structure.layers) if s.num_experts]


def expert_plan(model: nn.Module, keep: int, seed: int):
    """prunekit's plan that leaves `keep` routed experts in every MoE layer: uniform allocation of
    expert moves from random scores, with the target at the parameters of that many removals
    (less half a removal, so that the greedy loop stops at exactly that count)."""
    from prunekit.models.structure import model_structure
    from prunekit.plan.planner import PlannerSettings, make_plan
    from prunekit.plan.plan import predicted_structure
    from prunekit.score.scores import Scores

    structure = model_structure(model)
    sparse = moe_layers(structure)
    now = structure.layers[sparse[0]].num_experts
    removals = now - keep
    per_step = sum(structure.layer_costs[i].per_expert + structure.layers[i].intermediate_size
                   * structure.layer_costs[i].per_expert_channel for i in sparse)
    target = (removals - 0.5) * per_step / structure.non_embedding_params
    generator = torch.Generator().manual_seed(seed)
    scores = Scores("random", {"expert": [torch.rand(s.num_experts, generator=generator, dtype=torch.float64)
                                          for s in structure.layers]}, {"seed": seed})
    plan = make_plan(structure, scores, PlannerSettings(target=target, allocation="uniform", prune=("expert",)),
                     comparable=False)
    after = predicted_structure(plan, structure)
    counts = {after.layers[i].num_experts for i in sparse}
    if counts != {keep}:
        raise RuntimeError(f"the planner left {sorted(counts)} experts per layer, not {keep}")
    return plan


def narrowing_plan(model: nn.Module, fraction: float, multiple: int, seed: int):
    """prunekit's plan that removes `fraction` of every routed expert's channels (each expert its
    own, random scores; uniform allocation, widths a multiple of `multiple`): the channel analogue
    of `expert_plan`, which cuts the FLOPs of the top-k experts a token runs, unlike whole experts."""
    from prunekit.models.structure import model_structure
    from prunekit.plan.planner import PlannerSettings, make_plan
    from prunekit.plan.plan import predicted_structure
    from prunekit.score.scores import Scores

    structure = model_structure(model)
    sparse = moe_layers(structure)
    width = structure.layers[sparse[0]].intermediate_size
    goal = round(width * (1 - fraction) / multiple) * multiple
    if not 0 < goal < width:
        raise ValueError(f"--narrow {fraction} leaves {goal} of {width} channels at a multiple of {multiple}; choose another")
    per_step = sum(structure.layers[i].num_experts * multiple * structure.layer_costs[i].per_expert_channel for i in sparse)
    target = ((width - goal) / multiple - 0.5) * per_step / structure.non_embedding_params
    generator = torch.Generator().manual_seed(seed)
    scores = Scores("random", {"expert_channel": [
        torch.rand(s.num_experts, s.intermediate_size, generator=generator, dtype=torch.float64) if s.num_experts
        else torch.zeros(0, dtype=torch.float64) for s in structure.layers]}, {"seed": seed})
    settings = PlannerSettings(target=target, allocation="uniform", prune=("expert_channel",), ffn_multiple=multiple)
    plan = make_plan(structure, scores, settings, comparable=False)
    after = predicted_structure(plan, structure)
    widths = {after.layers[i].intermediate_size for i in sparse}
    if widths != {goal}:
        raise RuntimeError(f"the planner left experts {sorted(widths)} wide, not {goal}")
    return plan


def describe(model: nn.Module) -> dict:
    from prunekit.models.structure import model_structure

    structure = model_structure(model)
    sparse = moe_layers(structure)
    active = sum(structure.layer_costs[i].active_params(s, structure.experts_per_token)
                 for i, s in enumerate(structure.layers)) + structure.other_params
    return {
        "layers": structure.num_layers,
        "moe_layers": len(sparse),
        "experts_per_layer": sorted({structure.layers[i].num_experts for i in sparse}),
        "experts_per_token": structure.experts_per_token,
        "expert_width": sorted({structure.layers[i].intermediate_size for i in sparse}),
        "params": structure.total_params,
        "non_embedding_params": structure.non_embedding_params,
        "active_non_embedding_params": active,
        "prefill_flops_per_token_2048": structure.flops_per_token(2048),
        "model_type": model.config.model_type,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }


def experts_read_per_step(experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a decode step of `batch` rows routes to, per layer, under uniform routing."""
    return experts * (1 - (1 - min(top_k, experts) / experts) ** batch)


# ----------------------------------------------------------------------------- timing


def rates(seconds: list[float], work: float) -> dict:
    values = sorted(work / s for s in seconds)
    return {"tokens_per_s": statistics.median(values), "min": values[0], "max": values[-1],
            "seconds": [round(s, 5) for s in seconds]}


class Peak:
    """Peak allocated GPU memory inside the block, absolute and above what was allocated before it."""

    def __init__(self, device: torch.device):
        self.device, self.result = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"peak_gib": peak / 2**30, "above_model_gib": (peak - self.before) / 2**30}
        return False


@torch.no_grad()
def prefill(model: nn.Module, batch: int, length: int, repeats: int, device: torch.device) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    call = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    with Peak(device) as peak:
        call()  # warm-up, and the peak
    out = rates([timed(call, device) for _ in range(repeats)], batch * length)
    out["memory"] = peak.result
    return out


@torch.no_grad()
def eager_decode(model: nn.Module, batch: int, context: int, steps: int, repeats: int, device: torch.device) -> dict:
    """Greedy decode steps with a DynamicCache after a `context`-token prompt; every repeat starts
    from a fresh prompt, and only the steps are timed."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(2)
    seconds, peaks = [], []
    for repeat in range(repeats + 1):  # the first is a warm-up
        prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device)
        cache = DynamicCache(config=model.config)
        with Peak(device) as peak:
            logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)

            def run():
                nonlocal token
                for _ in range(steps):
                    token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

            elapsed = timed(run, device)
        if repeat:
            seconds.append(elapsed)
            peaks.append(peak.result)
        del cache
    out = rates(seconds, batch * steps)
    out["memory"] = peaks[-1]
    return out


def graph_decode(model: nn.Module, batch: int, context: int, steps: int, repeats: int, device: torch.device) -> dict:
    """Static-cache decode steps replayed from a CUDA graph (gpu_speed.GraphDecode)."""
    from gpu_speed import GraphDecode

    step = GraphDecode(model, batch, context, device, use_graph=True, max_steps=steps)
    try:
        step.run(steps)  # warm-up
        return rates([timed(lambda: step.run(steps), device) for _ in range(repeats)], batch * steps)
    finally:
        step.release()


def measure(model: nn.Module, args, device: torch.device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    entry = {"shape": describe(model)}
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    entry["memory"] = {"parameters_gib": parameter_bytes / 2**30}
    if device.type == "cuda":
        entry["memory"]["allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    entry["prefill"] = {}
    for batch, length in args.prefill:
        started = time.time()
        entry["prefill"][f"{batch}x{length}"] = prefill(model, batch, length, args.repeats, device)
        log(f"    prefill {batch}x{length}: {entry['prefill'][f'{batch}x{length}']['tokens_per_s']:,.0f} tok/s "
            f"({time.time() - started:.1f} s)")
    entry["decode"] = {}
    experts = entry["shape"]["experts_per_layer"][0]
    top_k = entry["shape"]["experts_per_token"]
    for batch in args.decode_batches:
        started = time.time()
        result = eager_decode(model, batch, args.context, args.decode_steps, args.repeats, device)
        result["experts_read_per_layer_uniform"] = experts_read_per_step(experts, top_k, batch)
        entry["decode"][f"b{batch}_eager"] = result
        log(f"    decode b{batch} eager: {result['tokens_per_s']:,.1f} tok/s ({time.time() - started:.1f} s)")
        if args.graph and device.type == "cuda":
            started = time.time()
            try:
                result = graph_decode(model, batch, args.context, args.decode_steps, args.repeats, device)
                log(f"    decode b{batch} graph: {result['tokens_per_s']:,.1f} tok/s ({time.time() - started:.1f} s)")
            except Exception as error:  # noqa: BLE001  (recorded; the eager figures stand)
                result = {"error": f"{type(error).__name__}: {error}"[:500]}
                log(f"    decode b{batch} graph failed: {result['error'][:200]}")
            entry["decode"][f"b{batch}_graph"] = result
    return entry


def ratios(dense: dict, pruned: dict) -> dict:
    """pruned / dense for memory and the ideals; pruned / dense tokens/s for speed (above 1: faster)."""
    out = {
        "parameters_bytes": pruned["memory"]["parameters_gib"] / dense["memory"]["parameters_gib"],
        "active_params": pruned["shape"]["active_non_embedding_params"] / dense["shape"]["active_non_embedding_params"],
        "prefill_flops": pruned["shape"]["prefill_flops_per_token_2048"] / dense["shape"]["prefill_flops_per_token_2048"],
        "prefill_speedup": {k: pruned["prefill"][k]["tokens_per_s"] / v["tokens_per_s"] for k, v in dense["prefill"].items()},
        "decode_speedup": {k: pruned["decode"][k]["tokens_per_s"] / v["tokens_per_s"] for k, v in dense["decode"].items()
                           if "tokens_per_s" in v and "tokens_per_s" in pruned["decode"].get(k, {})},
        "experts_read_per_step": {k: pruned["decode"][k]["experts_read_per_layer_uniform"] / v["experts_read_per_layer_uniform"]
                                  for k, v in dense["decode"].items() if "experts_read_per_layer_uniform" in v},
    }
    if "allocated_gib" in dense["memory"]:
        out["allocated"] = pruned["memory"]["allocated_gib"] / dense["memory"]["allocated_gib"]
        out["prefill_peak"] = {k: pruned["prefill"][k]["memory"]["peak_gib"] / v["memory"]["peak_gib"]
                               for k, v in dense["prefill"].items()}
    return out


# ----------------------------------------------------------------------------- tables

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"qwen3-30b-a3b": "Qwen3-30B-A3B", "mixtral-8x7b": "Mixtral-8x7B"}


def record_name(path: Path) -> str:
    """How tools/docs_check.py names the record: relative to benchmarks/results/ when it lies there."""
    try:
        return str(path.resolve().relative_to(RESULTS))
    except ValueError:
        return str(path)


class Row:
    """One Markdown table row whose every figure carries its docs-check reference, so that the
    printed line pastes into the docs as it is (tools/docs_check.py reads the references)."""

    def __init__(self, *cells: str):
        self.cells, self.refs = list(cells), []

    def add(self, text: str, ref: str) -> str:
        """`text` is printed; the figure in it (the part before any unit) is checked against `ref`."""
        self.refs.append(f"{text}@{ref}")
        return text

    def line(self) -> str:
        return "| " + " | ".join(self.cells) + " |" + (f" <!-- fig {'; '.join(self.refs)} -->" if self.refs else "")


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(record: dict, name: str) -> str:
    """Per shape, three tables, each pruned model beside the dense one (in brackets pruned / dense):
    the shapes, memory, and speed with the ideals the script records beside the measurements (prefill
    FLOPs per token; distinct experts a decode step reads under uniform routing)."""
    command = record["command"].replace("/root/out/", "")
    command = command if command.startswith("python") else f"python {command}"
    versions = record["versions"]
    minutes = record["seconds"] / 60
    lines = [f"`{command}` ({versions.get('gpu', 'cpu')}, torch {versions['torch']}, transformers "
             f"{versions['transformers']}, {versions['date']}; {minutes:.1f} min in all) "
             f"<!-- record: {name} --> <!-- fig {minutes:.1f}@{{seconds}}/60 -->", ""]
    for shape, entry in record["shapes"].items():
        models, ratios_ = entry["models"], entry["ratios"]
        dense = models["dense"]
        at_models, at_ratios = f"shapes/{shape}/models", f"shapes/{shape}/ratios"
        built, whole = entry["layers_built"], entry["layers_of_published_model"]
        lines.append(f"**{LABELS.get(shape, shape)} shape** ({built} of its {whole} layers"
                     f"{'' if built == whole else ', the first ones'}; {dense['shape']['experts_per_layer'][0]} routed "
                     f"experts of {dense['shape']['expert_width'][0]} channels per layer, top-"
                     f"{dense['shape']['experts_per_token']}), random bf16 weights. <!-- record: {name} -->")
        lines.append("")

        def bracket(row: Row, model: str, text: str, ref: str, unit: str = "") -> str:
            return "" if model == "dense" else f" ({row.add(text, ref)}{unit})"

        # the shapes
        lines.append("| model | experts per layer | expert width | parameters (billions) | "
                     "active per token, non-embedding (billions) |")
        lines.append("|---|---|---|---|---|")
        for model, m in models.items():
            at = f"{at_models}/{model}/shape"
            row = Row(model, str(m["shape"]["experts_per_layer"][0]), str(m["shape"]["expert_width"][0]))
            row.cells.append(row.add(f"{m['shape']['params'] / 1e9:.2f}", f"{{{at}/params}}/1e9") + bracket(
                row, model, f"{m['shape']['params'] / dense['shape']['params']:.2f}",
                f"{{{at}/params}}/{{{at_models}/dense/shape/params}}"))
            row.cells.append(row.add(f"{m['shape']['active_non_embedding_params'] / 1e9:.2f}",
                                     f"{{{at}/active_non_embedding_params}}/1e9") + bracket(
                row, model, f"{ratios_.get(model, {}).get('active_params', 1):.2f}", f"{at_ratios}/{model}/active_params"))
            lines.append(row.line())
        lines.append("")
        # memory
        prefill_keys = list(dense["prefill"])
        decode_keys = [k for k in dense["decode"] if "tokens_per_s" in dense["decode"][k]]
        resident = "allocated_gib" in dense["memory"]  # CUDA runs only
        header = ["model", "parameters GiB"]
        if resident:
            header += ["resident GiB"] + [f"peak GiB, prefill {k}" for k in prefill_keys]
            header += [f"peak GiB, decode {k.replace('_', ' ')}" for k in decode_keys]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for model, m in models.items():
            at = f"{at_models}/{model}"
            row = Row(model)
            row.cells.append(row.add(f"{m['memory']['parameters_gib']:.2f}", f"{at}/memory/parameters_gib") + bracket(
                row, model, f"{ratios_.get(model, {}).get('parameters_bytes', 1):.2f}", f"{at_ratios}/{model}/parameters_bytes"))
            if resident:
                row.cells.append(row.add(f"{m['memory']['allocated_gib']:.2f}", f"{at}/memory/allocated_gib") + bracket(
                    row, model, f"{ratios_.get(model, {}).get('allocated', 1):.2f}", f"{at_ratios}/{model}/allocated"))
                row.cells += [row.add(f"{m['prefill'][k]['memory']['peak_gib']:.2f}", f"{at}/prefill/{k}/memory/peak_gib")
                              for k in prefill_keys]
                row.cells += [row.add(f"{m['decode'][k]['memory']['peak_gib']:.2f}", f"{at}/decode/{k}/memory/peak_gib")
                              for k in decode_keys]
            lines.append(row.line())
        lines.append("")
        # speed, with the ideals beside it
        header = ["model"] + [f"prefill {k} tok/s" for k in prefill_keys]
        header += ["prefill GFLOP per token (ideal speedup)"]
        header += [f"decode {k.replace('_', ' (')}) tok/s" for k in decode_keys]
        header += ["distinct experts read per layer and decode step, " + " / ".join(k.split("_")[0] for k in decode_keys)
                   + " (pruned / dense)"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for model, m in models.items():
            at = f"{at_models}/{model}"
            row = Row(model)
            for kind, keys in (("prefill", prefill_keys), ("decode", decode_keys)):
                for k in keys:
                    result = m[kind].get(k, {})
                    if "tokens_per_s" not in result:
                        row.cells.append("failed" if result else "")
                        continue
                    row.cells.append(row.add(_rate(result["tokens_per_s"]), f"{at}/{kind}/{k}/tokens_per_s") + bracket(
                        row, model, f"{ratios_.get(model, {}).get(f'{kind}_speedup', {}).get(k, 1):.2f}",
                        f"{at_ratios}/{model}/{kind}_speedup/{k}", "x"))
                if kind == "prefill":  # removing experts leaves top-k: the FLOPs a token runs through barely move
                    flops = m["shape"]["prefill_flops_per_token_2048"]
                    row.cells.append(row.add(f"{flops / 1e9:.2f}", f"{{{at}/shape/prefill_flops_per_token_2048}}/1e9") + bracket(
                        row, model, f"{dense['shape']['prefill_flops_per_token_2048'] / flops:.2f}",
                        f"1/{{{at_ratios}/{model}/prefill_flops}}", "x"))
            reads = []
            for k in decode_keys:
                reads.append(row.add(f"{m['decode'][k]['experts_read_per_layer_uniform']:.1f}",
                                     f"{at}/decode/{k}/experts_read_per_layer_uniform") + bracket(
                    row, model, f"{ratios_.get(model, {}).get('experts_read_per_step', {}).get(k, 1):.2f}",
                    f"{at_ratios}/{model}/experts_read_per_step/{k}"))
            row.cells.append(" / ".join(reads))
            lines.append(row.line())
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of the same families (a CPU smoke test)")
    parser.add_argument("--qwen-layers", type=int, default=None, help="build only the first N of Qwen3-30B-A3B's 48 layers")
    parser.add_argument("--mixtral-layers", type=int, default=16,
                        help="build only the first N of Mixtral-8x7B's 32 layers (all 32 need 93 GB in bf16)")
    parser.add_argument("--removed", default="0.25,0.5", help="fractions of each MoE layer's routed experts to remove")
    parser.add_argument("--narrow", type=float, default=0.0,
                        help="then also remove this fraction of every remaining expert's channels (on top of the last "
                             "expert cut) and measure again; 0 skips it")
    parser.add_argument("--width-multiple", type=int, default=None, help="expert widths stay multiples of it (default 128)")
    parser.add_argument("--prefill", default=None, help="batch x length, comma-separated (default 1x2048,8x512)")
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens before the timed decode steps (default 512)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up")
    parser.add_argument("--graph", action="store_true", help="also time static-cache decode replayed from a CUDA graph")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the JSON record, rewritten after every measured model")
    parser.add_argument("--markdown", metavar="RECORD", help="print GPU_BENCHMARKS.md's tables of this record and stop "
                                                            "(no GPU needed)")
    args = parser.parse_args(argv)
    if not args.markdown and not args.out:
        parser.error("--out is required (or --markdown RECORD to print the tables of a record)")
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    args.removed = [float(f) for f in args.removed.split(",") if f]
    if any(not 0 < f < 1 for f in args.removed):
        parser.error(f"--removed takes fractions in (0, 1), e.g. 0.25,0.5; got {args.removed}")
    args.prefill = [tuple(int(v) for v in p.split("x")) for p in (args.prefill or ("1x64" if args.tiny else "1x2048,8x512")).split(",")]
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    if not 0 <= args.narrow < 1:
        parser.error(f"--narrow takes a fraction in [0, 1), e.g. 0.5; got {args.narrow}")
    args.width_multiple = args.width_multiple or (8 if args.tiny else 128)
    args.context = args.context or (16 if args.tiny else 512)
    args.decode_steps = args.decode_steps or (4 if args.tiny else 32)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text()), record_name(Path(args.markdown))))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_moe: no CUDA GPU is visible here; run it on a GPU machine, or pass --device cpu --tiny", file=sys.stderr)
        return 2
    from prunekit.prune.surgery import apply_plan

    started = time.time()
    record = {"command": " ".join(sys.argv), "versions": versions(device),
              "settings": {k: v for k, v in vars(args).items()},
              "scores": "random expert scores (seeded): speed and memory depend on how many experts go, not which",
              "allocation": "uniform (every MoE layer keeps the same count: the stock family)",
              "order": "dense, then cut in place to each fraction and measured (one copy on the GPU, so not interleaved)",
              "shapes": {}}
    out = Path(args.out)

    def save() -> None:
        record["seconds"] = round(time.time() - started, 1)
        out.write_text(json.dumps(record, indent=1))

    for shape in args.shapes:
        full_layers = SHAPES[shape]["num_hidden_layers"]
        layers = TINY_LAYERS if args.tiny else (args.mixtral_layers if shape == "mixtral-8x7b" else args.qwen_layers)
        config = shape_config(shape, layers, args.tiny)
        entry = record["shapes"][shape] = {
            "layers_built": config.num_hidden_layers, "layers_of_published_model": full_layers,
            "config": {k: getattr(config, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "head_dim", "vocab_size",
                                                             "num_experts", "num_local_experts", "num_experts_per_tok",
                                                             "moe_intermediate_size", "intermediate_size")},
            "models": {}, "ratios": {},
        }
        t0 = time.time()
        model = build(config, device, args.seed)
        entry["build_seconds"] = round(time.time() - t0, 1)
        log(f"{shape}: {config.num_hidden_layers} of {full_layers} layers built and filled in {entry['build_seconds']} s")
        dense_experts = describe(model)["experts_per_layer"][0]
        name = "dense"
        log(f"  dense ({dense_experts} experts per layer)")
        entry["models"]["dense"] = measure(model, args, device)
        save()
        for fraction in args.removed:
            keep = dense_experts - round(dense_experts * fraction)
            name = f"experts-{round(fraction * 100)}"
            t0 = time.time()
            plan = expert_plan(model, keep, args.seed)
            apply_plan(model, plan)
            prune_seconds = round(time.time() - t0, 1)
            log(f"  {name} ({keep} experts per layer; planned and cut in place in {prune_seconds} s)")
            entry["models"][name] = measure(model, args, device)
            entry["models"][name]["prune_seconds"] = prune_seconds
            entry["ratios"][name] = ratios(entry["models"]["dense"], entry["models"][name])
            log("    ratios to dense: " + json.dumps({k: v for k, v in entry["ratios"][name].items()
                                                       if k in ("parameters_bytes", "prefill_speedup", "decode_speedup")},
                                                      default=lambda x: x)[:400])
            save()
        if args.narrow:
            name = f"{name}+width-{round(args.narrow * 100)}"
            t0 = time.time()
            apply_plan(model, narrowing_plan(model, args.narrow, args.width_multiple, args.seed))
            prune_seconds = round(time.time() - t0, 1)
            log(f"  {name} (experts {describe(model)['expert_width'][0]} wide; planned and cut in place in {prune_seconds} s)")
            entry["models"][name] = measure(model, args, device)
            entry["models"][name]["prune_seconds"] = prune_seconds
            entry["ratios"][name] = ratios(entry["models"]["dense"], entry["models"][name])
            save()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    log(f"done in {record['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
