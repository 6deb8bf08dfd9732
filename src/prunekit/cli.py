"""The `prunekit` command. Each subcommand is a thin shell over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.models.loading import DEFAULT_MODEL, DTYPES
from prunekit.plan.plan import PlanError


class CommandLineError(PrunekitError, ValueError):
    """An option's value cannot be read (e.g. KEY=VALUE without the =)."""


def format_structure(structure, title: str, seq_len: int) -> str:
    from prunekit.models.structure import format_count

    lines = [
        f"{title}: {structure.model_type}, {structure.num_layers} layers, hidden {structure.hidden_size}, "
        f"head_dim {structure.head_dim}, vocab {structure.vocab_size}",
        f"params: total {format_count(structure.total_params, 2)} ({structure.total_params:,}), non-embedding "
        f"{format_count(structure.non_embedding_params, 2)}, embedding {format_count(structure.embedding_params, 2)}; "
        f"FLOPs/token {format_count(structure.flops_per_token(seq_len), 2)} at seq_len {seq_len}",
        "",
        f"{'layer':>5}  {'type':<8} {'q heads':>7}  {'GQA groups':<18} {'FFN ch':>6}  "
        f"{'attn params':>11}  {'mlp params':>10}  {'FLOPs/token':>11}",
    ]
    for i, shape in enumerate(structure.layers):
        costs = structure.layer_costs[i]
        attention = costs.params(shape.attention_part()) - costs.other
        mlp = costs.params(shape.mlp_part()) - costs.other
        groups = (
            f"{shape.num_key_value_heads} x {shape.heads_per_group} q/group" if shape.num_attention_heads else "attention removed"
        )
        layer_type = (structure.layer_types[i] if structure.layer_types else "full_attention").split("_")[0]
        flops = structure.layer_flops_per_token(i, seq_len)
        lines.append(
            f"{i:>5}  {layer_type:<8} {shape.num_attention_heads:>7}  {groups:<18} "
            f"{shape.intermediate_size if shape.intermediate_size else 'removed':>6}  {format_count(attention, 2):>11}  "
            f"{format_count(mlp, 2):>10}  {format_count(flops, 2):>11}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inspect
def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="directory, .gguf file, hub id or smollm2-135m")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for attention FLOPs (default 2048)")


def _run_inspect(args: argparse.Namespace) -> int:
    from prunekit.models.loading import load_skeleton, resolve_model_source
    from prunekit.models.structure import model_structure

    # Shapes only: the model is built on the meta device, no weight is read.
    structure = model_structure(load_skeleton(resolve_model_source(args.model)))
    if args.json:
        print(json.dumps({"model": args.model, **structure.to_dict(args.seq_len)}, indent=1))
    else:
        print(format_structure(structure, args.model, args.seq_len))
    return 0


# ----------------------------------------------------------------------------- prune
def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _key_values(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandLineError(f"{what} takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration data")
    group.add_argument("--calib", default="c4", help="named set (c4, wikitext2, ptb, alpaca), a .txt or .jsonl[:field] "
                       "file, or 'self' (text sampled from the model; no data set needed). Default c4")
    group.add_argument("--calib-samples", type=int, default=128, help="number of sequences (default 128)")
    group.add_argument("--calib-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    group.add_argument("--calib-task", default=None,
                       help="prompt/response pairs (alpaca or a .jsonl with prompt/response): measure the loss on the "
                       "responses only, to keep what your task needs")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--data-dir", default=None, help="local data sets (default: $PRUNEKIT_DATA_DIR)")
    group.add_argument("--batch-size", type=int, default=8)


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="where scoring and compensation run: cpu (default), cuda or cuda:N")
    parser.add_argument("--layer-by-layer", action="store_true",
                        help="keep the model in CPU memory and run one decoder layer at a time on --device, over "
                        "calibration states kept there: prunes models larger than the GPU (activation, fluctuation, "
                        "block_influence, magnitude, random)")


def _calibration_settings(args: argparse.Namespace):
    from prunekit.pipeline import CalibrationSettings

    return CalibrationSettings(source=args.calib, n_samples=args.calib_samples, seq_len=args.calib_seq_len,
                               seed=args.seed, task=args.calib_task, data_dir=args.data_dir)


def _add_prune(parser: argparse.ArgumentParser) -> None:
    from prunekit.pipeline import COMPENSATIONS, PruneSettings
    from prunekit.plan.planner import ALLOCATIONS, BASES, MOVE_KINDS
    from prunekit.score import CRITERIA

    defaults = PruneSettings()
    parser.add_argument("model", help="directory, .gguf file, hub id or smollm2-135m")
    parser.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--plan", help="apply this plan JSON file (format: README, 'Plans')")
    how.add_argument("--target", type=float, help="fraction of --basis to remove, e.g. 0.3")
    parser.add_argument("--basis", default=defaults.basis, choices=BASES,
                        help=f"what --target counts (default {defaults.basis} parameters)")
    parser.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                        help="importance criterion (default: magnitude with --compensation obs, the default, "
                             "which re-picks the units; taylor with any other compensation)")
    parser.add_argument("--criterion-option", action="append", metavar="KEY=VALUE",
                        help="criterion option, e.g. variant=vector (taylor), angular=true (block_influence), "
                        "kinds=layer,head (sensitivity)")
    parser.add_argument("--allocation", default=defaults.allocation, choices=ALLOCATIONS,
                        help=f"how the removal is spread over layers (default {defaults.allocation})")
    parser.add_argument("--allocation-option", action="append", metavar="KEY=VALUE",
                        help="allocation option, e.g. alpha=7 (slimllm's softmax temperature), amplitude=0.5 "
                        "(adapt_pruner's skew)")
    parser.add_argument("--prune-structures", default=",".join(defaults.prune),
                        help=f"what may be removed, from {','.join(MOVE_KINDS)} (default {','.join(defaults.prune)})")
    parser.add_argument("--limit", action="append", metavar="KIND=FRACTION",
                        help="at most this fraction of a kind removed, e.g. head=0.3")
    parser.add_argument("--ffn-multiple", type=int, default=defaults.ffn_multiple,
                        help=f"FFN widths are kept at multiples of this (default {defaults.ffn_multiple})")
    parser.add_argument("--hidden-multiple", type=int, default=defaults.hidden_multiple,
                        help=f"the hidden size is kept at multiples of this (default {defaults.hidden_multiple})")
    parser.add_argument("--protect-layers", default="", help="layers never pruned, e.g. 0,1")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="reach the target in this many steps, scoring "
                        "again between them (default 1)")
    parser.add_argument("--compensation", default=defaults.compensation, choices=COMPENSATIONS,
                        help="least-squares refit of o_proj/down_proj after the cut: sequential (layer by layer on the "
                        "pruned model's inputs), one-shot (original inputs), obs (sequential, and structured OBS re-picks "
                        "which heads and channels each layer loses, same widths; a --plan is refitted as it is) or none (default %(default)s)")
    parser.add_argument("--no-compensate", action="store_true", help="the same as --compensation none")
    parser.add_argument("--bias-compensation", action="store_true",
                        help="add FLAP-style bias compensation (Llama; with --compensation one-shot)")
    parser.add_argument("--reconstruct-steps", type=int, default=defaults.reconstruct_steps, metavar="N",
                        help="after the cut, train every kept weight of each layer for up to N Adam steps toward the "
                        "original layer on the calibration rows (default %(default)s: none)")
    parser.add_argument("--replace-dropped-layers", action="store_true",
                        help="fold each span of dropped layers into the kept layer before it as a least-squares linear "
                        "map on the calibration rows (ReplaceMe; not for Gemma's sandwich norms)")
    parser.add_argument("--reconstruct-lr", type=float, default=defaults.reconstruct_lr,
                        help="learning rate of --reconstruct-steps (default %(default)s)")
    parser.add_argument("--scores", default=None, help="plan from this scores.json (what `prunekit analyze` wrote) "
                        "instead of scoring again")
    parser.add_argument("--search-generations", type=int, default=defaults.search.generations, metavar="N",
                        help="--allocation search: generations of the evolutionary search (default %(default)s)")
    parser.add_argument("--search-minutes", type=float, default=defaults.search.minutes, metavar="M",
                        help="--allocation search: stop after M minutes even if generations remain")
    parser.add_argument("--search-offspring", type=int, default=defaults.search.offspring, metavar="N",
                        help="--allocation search: candidates per generation (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype to load and prune in")
    parser.add_argument("--save-dtype", default="source", metavar="DTYPE",
                        help="dtype of the saved weights: source (default: the dtype the source declares, bfloat16 "
                        "for a GGUF file), float32, bfloat16 or float16")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the predicted size, time, "
                        "memory and disk; load no weights")
    _add_device_arguments(parser)
    _add_calibration_arguments(parser)


def _prune_settings(args: argparse.Namespace):
    from prunekit.pipeline import PruneSettings
    from prunekit.plan.search import SearchSettings

    limits = {}
    for kind, value in _key_values(args.limit, "--limit").items():
        try:
            limits[kind] = float(value)
        except ValueError:
            raise PlanError(f"--limit {kind}={value}: the limit must be a fraction such as 0.3") from None
    try:
        protect = tuple(int(i) for i in _csv(args.protect_layers))
    except ValueError:
        raise PlanError(f"--protect-layers takes layer indices such as 0,1, got {args.protect_layers!r}") from None
    return PruneSettings(
        target=args.target, basis=args.basis, criterion=args.criterion,
        criterion_options=_key_values(args.criterion_option, "--criterion-option"), allocation=args.allocation,
        allocation_options=_allocation_options(args.allocation_option),
        prune=_csv(args.prune_structures), limits=limits, ffn_multiple=args.ffn_multiple,
        hidden_multiple=args.hidden_multiple, protect_layers=protect,
        compensation="none" if args.no_compensate else args.compensation, bias_compensation=args.bias_compensation,
        steps=args.steps, reconstruct_steps=args.reconstruct_steps, reconstruct_lr=args.reconstruct_lr,
        replace_dropped_layers=args.replace_dropped_layers,
        batch_size=args.batch_size, calibration=_calibration_settings(args),
        device=args.device, layer_by_layer=args.layer_by_layer, scores=args.scores,
        search=SearchSettings(generations=args.search_generations, minutes=args.search_minutes,
                              offspring=args.search_offspring, seed=args.seed),
    )


def _allocation_options(pairs: list[str] | None) -> dict[str, float]:
    options = {}
    for key, value in _key_values(pairs, "--allocation-option").items():
        try:
            options[key] = float(value)
        except ValueError:
            raise PlanError(f"--allocation-option {key}={value}: the value must be a number such as 7") from None
    return options


def _run_prune(args: argparse.Namespace) -> int:
    import time

    from prunekit.export.huggingface import parse_save_dtype
    from prunekit.pipeline import prune, prune_summary
    from prunekit.preflight import format_preflights

    if args.plan and args.target is None:
        args.target = 0.3  # unused with a plan; a valid value keeps the settings' checks quiet
    save_dtype = parse_save_dtype(args.save_dtype)  # a bad name, before anything loads
    started = time.perf_counter()
    result = prune(args.model, args.out, _prune_settings(args), plan=args.plan, force=args.force, dtype=args.dtype,
                   dry_run=args.dry_run, save_dtype=save_dtype)
    if args.dry_run:
        print(format_preflights([result]))
        return 0
    print(prune_summary(result, seconds=time.perf_counter() - started))
    return 0


# ----------------------------------------------------------------------------- analyze
def _add_analyze(parser: argparse.ArgumentParser) -> None:
    from prunekit.score import CRITERIA

    parser.add_argument("model", help="directory, .gguf file, hub id or smollm2-135m")
    parser.add_argument("--out", required=True, help="directory for scores.json, analysis.md and plots")
    parser.add_argument("--criterion", default="sensitivity", choices=sorted(CRITERIA), help="default sensitivity")
    parser.add_argument("--criterion-option", action="append", metavar="KEY=VALUE",
                        help="e.g. kinds=layer,attention,mlp,kv_group,head,channel channel_group_size=64")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    _add_device_arguments(parser)
    _add_calibration_arguments(parser)


def _run_analyze(args: argparse.Namespace) -> int:
    from prunekit.pipeline import analyze

    report = analyze(args.model, args.out, criterion=args.criterion,
                     criterion_options=_key_values(args.criterion_option, "--criterion-option"),
                     calibration=_calibration_settings(args), batch_size=args.batch_size, dtype=args.dtype,
                     force=args.force, device=args.device, layer_by_layer=args.layer_by_layer)
    print(f"wrote {report} (scores.json and plots beside it)")
    return 0


# ----------------------------------------------------------------------------- recover
def _add_recover(parser: argparse.ArgumentParser) -> None:
    from prunekit.recover import METHODS, RecoveryData, RecoverySettings

    defaults, data = RecoverySettings(), RecoveryData()
    parser.add_argument("model", help="the pruned model directory (what `prunekit prune` wrote)")
    parser.add_argument("--out", required=True, help="output directory (a model directory like prune's; LoRA merged)")
    parser.add_argument("--method", default=defaults.method, choices=list(METHODS),
                        help="lora (LoRA on cross-entropy), distill (every weight, KL to the teacher), lora+distill, "
                        "full (every weight, cross-entropy); default %(default)s")
    parser.add_argument("--teacher", default=None, help="the original model (needed by distill methods and --data self)")
    parser.add_argument("--data", default=data.source,
                        help="c4, wikitext2, ptb, a .txt / .jsonl[:field] file, 'self' (text the teacher writes), or "
                        "prompt/response pairs: alpaca or a .jsonl with --pairs (loss on the responses); default c4")
    parser.add_argument("--pairs", action="store_true", help="read --data as prompt/response pairs (alpaca implies it)")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="training token budget (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=data.seq_len, help="tokens per row (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-5 for full, 2e-4 for the others)")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="fraction of steps warming up")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--lora-targets", default=",".join(defaults.lora_targets),
                        help="module names, or all-linear (default)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="distillation temperature")
    parser.add_argument("--ce-weight", type=float, default=defaults.ce_weight, help="cross-entropy mixed into distillation")
    parser.add_argument("--hidden-weight", type=float, default=defaults.hidden_weight,
                        help="hidden-state matching at kept layers, mixed into distillation")
    parser.add_argument("--teacher-cache", type=int, default=defaults.teacher_cache, metavar="K",
                        help="cache the teacher's top-K logits before training and free it (0: on the fly)")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between held-out perplexities")
    parser.add_argument("--held-out", type=int, default=data.held_out, help="rows kept apart for held-out perplexity")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between checkpoints in OUT.checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.checkpoints after success")
    parser.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16"])
    parser.add_argument("--shard", action="store_true",
                        help="under accelerate launch / torchrun: split weights, gradients and optimizer state over "
                             "the processes (FSDP2), for a model whose training does not fit one GPU")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="keep only each layer's input and recompute the rest in the backward pass "
                             "(about a third more compute, much less activation memory)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-dir", default=None, help="local data sets (default: $PRUNEKIT_DATA_DIR)")
    parser.add_argument("--force", action="store_true", help="replace --out (and old checkpoints) if they exist")


def _run_recover(args: argparse.Namespace) -> int:
    from prunekit.models.memory import describe_peak
    from prunekit.recover import PAIR_SOURCES, RecoveryData, RecoverySettings, recover

    data = RecoveryData(source=args.data, pairs=args.pairs or args.data in PAIR_SOURCES, seq_len=args.seq_len,
                        held_out=args.held_out, seed=args.seed, data_dir=args.data_dir)
    settings = RecoverySettings(
        method=args.method, tokens=args.tokens, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=_csv(args.lora_targets),
        temperature=args.temperature, ce_weight=args.ce_weight, hidden_weight=args.hidden_weight,
        teacher_cache=args.teacher_cache, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        precision=args.precision, shard=args.shard, activation_checkpointing=args.activation_checkpointing,
        seed=args.seed, data=data,
    )
    saved = recover(args.model, args.out, settings, teacher=args.teacher, force=args.force, resume=args.resume,
                    keep_checkpoints=args.keep_checkpoints)
    if saved is None:  # another process of `accelerate launch` wrote the model
        return 0
    recovery = json.loads((saved.path / "prunekit.json").read_text())["recovery"]
    if recovery["eval"]:
        (_, before), (_, after) = recovery["eval"][0], recovery["eval"][-1]
        print(f"held-out perplexity {before:.2f} -> {after:.2f} over {recovery['tokens']:,} training tokens")
    print(f"saved {saved.format} model with {saved.params:,} parameters to {saved.path}")
    memory = describe_peak(recovery.get("memory"))
    if memory:
        print(f"  memory: {memory}")
    return 0


# ----------------------------------------------------------------------------- run
def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file (examples in recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. prune.target=0.4")
    parser.add_argument("--out", required=True, help="run directory: every stage's artifact and record go here; "
                        "running again skips finished stages and resumes a killed one")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the whole recipe and print the stages with a rough cost; load no weights")


def _run_run(args: argparse.Namespace) -> int:
    from prunekit.runner import run

    run(args.recipe, args.out, overrides=tuple(args.overrides), dry_run=args.dry_run)
    return 0


# ----------------------------------------------------------------------------- sweep
def _add_sweep(parser: argparse.ArgumentParser) -> None:
    from prunekit.pipeline import COMPENSATIONS, PruneSettings
    from prunekit.plan.planner import ALLOCATIONS, BASES
    from prunekit.score import CRITERIA

    defaults = PruneSettings()
    parser.add_argument("model", help="directory, .gguf file, hub id or smollm2-135m")
    parser.add_argument("--out", required=True, help="directory for sweep.json, sweep.md and the figures")
    parser.add_argument("--targets", default="0.1,0.2,0.3,0.4,0.5", help="fractions of --basis to remove")
    parser.add_argument("--basis", default=defaults.basis, choices=BASES)
    parser.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                        help="default: magnitude with --compensation obs, taylor with any other")
    parser.add_argument("--allocation", default=defaults.allocation, choices=ALLOCATIONS)
    parser.add_argument("--prune-structures", default=",".join(defaults.prune))
    parser.add_argument("--compensation", default=defaults.compensation, choices=COMPENSATIONS)
    parser.add_argument("--eval", default="auto", help="perplexity source: wikitext2, c4, ptb, a file, self, or auto "
                        "(wikitext2 where the local data has it, else self); default auto")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window length (default 512)")
    parser.add_argument("--window-every", type=int, default=16, help="every n-th window (default 16)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype to load and prune in")
    _add_device_arguments(parser)
    _add_calibration_arguments(parser)


def _run_sweep(args: argparse.Namespace) -> int:
    from prunekit.pipeline import PruneSettings
    from prunekit.runner.sweep import SweepSettings, format_sweep, sweep

    try:
        targets = tuple(float(t) for t in _csv(args.targets))
    except ValueError:
        raise PlanError(f"--targets takes fractions such as 0.1,0.2,0.3, got {args.targets!r}") from None
    prune = PruneSettings(basis=args.basis, criterion=args.criterion, allocation=args.allocation,
                          prune=_csv(args.prune_structures), compensation=args.compensation,
                          batch_size=args.batch_size, calibration=_calibration_settings(args), device=args.device,
                          layer_by_layer=args.layer_by_layer)
    settings = SweepSettings(targets=targets, prune=prune, eval_source=args.eval, window_every=args.window_every,
                             eval_seq_len=args.eval_seq_len,
                             speed=not args.no_speed)
    record = sweep(args.model, args.out, settings, force=args.force, dtype=args.dtype)
    print(format_sweep(record))
    print(f"wrote {args.out}/sweep.md, sweep.json and figures")
    return 0


# ----------------------------------------------------------------------------- demo
def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="the run directory (default runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override keys of the demo recipe, e.g. "
                        "prune.target=0.4")
    parser.add_argument("--dry-run", action="store_true", help="preflight every stage and stop; load no weights")


def _run_demo(args: argparse.Namespace) -> int:
    from prunekit.runner import run

    run("demo", args.out, overrides=tuple(args.overrides), dry_run=args.dry_run)
    return 0


# ----------------------------------------------------------------------------- export
def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model: a directory (stock or pruned), a .gguf file or an embedded name")
    parser.add_argument("--format", default="gguf", help="what to write: gguf (llama.cpp), the only format so far")
    parser.add_argument("--out", required=True, help="the file to write, e.g. pruned.q4_k_m.gguf")
    parser.add_argument("--quant", default="f16", help="f16 (default), q8_0 or q4_k_m (q*: needs llama-cpp-python)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def _run_export(args: argparse.Namespace) -> int:
    from prunekit.export.gguf import export_gguf

    formats = {"gguf": export_gguf}
    if args.format not in formats:
        raise GGUFExportError(f"unknown export format {args.format!r}; supported: {', '.join(formats)}")
    print(formats[args.format](args.model, args.out, quant=args.quant, force=args.force).summary())
    return 0


from prunekit.evaluate.commands import BENCH_COMMAND, EVAL_COMMAND  # noqa: E402  (after the helpers they reuse)
from prunekit.export.gguf import GGUFExportError  # noqa: E402
from prunekit.report.run_report import REPORT_COMMAND  # noqa: E402

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "inspect": ("show the prunable structure of a model", _add_inspect, _run_inspect),
    "analyze": ("score every component (sensitivity by default) and write a report with plots", _add_analyze, _run_analyze),
    "prune": ("prune to a plan or a target and save the smaller dense model", _add_prune, _run_prune),
    "eval": EVAL_COMMAND,
    "bench": BENCH_COMMAND,
    "sweep": ("score once, prune at several targets, tabulate and plot quality and speed against size",
              _add_sweep, _run_sweep),
    "run": ("run a recipe: the whole job, stage by stage, resumable", _add_run, _run_run),
    "recover": ("train the pruned model back (LoRA, distillation from the original) and save it merged",
                _add_recover, _run_recover),
    "report": REPORT_COMMAND,
    "demo": ("run the demo recipe on the embedded default model: prune, recover, evaluate, time, report",
             _add_demo, _run_demo),
    "export": ("write a model for another runtime: a llama.cpp GGUF file, f16 or quantized", _add_export, _run_export),
}


# What to do after Ctrl-C, for the commands that can continue where they stopped.
RESUME_HINTS = {
    "run": "run the same command again to continue from the last finished stage",
    "recover": "run the same command with --resume to continue from the last checkpoint",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Structured pruning of transformer language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("run", "demo"):
        # argparse gives positionals that come after an option (`run R --out D k=v`) back unparsed
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except PrunekitError as error:
        if args.verbose:
            raise
        print(f"prunekit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command, "")
        print(f"prunekit {args.command}: interrupted; no output was left half-written" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
