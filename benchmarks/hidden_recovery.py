"""Issue 21: hidden-size pruning against FFN pruning and both, each before and after recovery by
distillation, on SmolLM2-135M at fractions of *total* parameters (the tied embedding counts).

Three pruned models per target T (calibration C4 --calib-samples x --calib-seq-len, seed 0):

- `hidden`: residual-stream channels alone, scored by `activation` (Minitron's criterion: the L2
  norm of what the sublayers' input norms output), global allocation, 64 at a move, cut after the
  least-squares refit of every projection that reads the stream (`refit_hidden_readers`): the
  `refit` column of benchmarks/hidden_pruning.py. The planner takes the fewest moves that reach T,
  so the hidden size overshoots T (448 / 320 / 256 of 576 at 20 / 35 / 50%).
- `ffn`: `prunekit prune MODEL --target T --basis total`, the default (FFN channels, magnitude
  order, log_increase budgets, structured OBS): the strongest FFN-only setting.
- `combined`: hidden channels for about --hidden-share (default half) of T, then the rest of T by the
  default prune with heads allowed (`--combined-structures`, default `channel,head`: the issue's
  "hidden + FFN + heads"; the default's magnitude order, log_increase budgets and structured OBS,
  which prune a layer's heads and FFN channels at one ratio). The hidden part is the multiple of
  --multiple nearest to share x T x hidden channels, at least one move: every weight matrix and the
  embedding have one side of hidden size, so d' of d channels keep d'/d of all parameters, and at
  SmolLM2's 576 the hidden size is 512 / 448 / 448 at 20 / 35 / 50%. It is cut as in `hidden`
  (same scores, same refit), then `prune_loaded` removes the rest from the narrower model (the same
  calibration rows, as the pruned model now computes them), i.e. the two commands
  `prunekit prune --prune-structures hidden --criterion activation --allocation global` and
  `prunekit prune --target REST --basis total --prune-structures channel,head`.
  Why a fixed share: left to the planner (global allocation, activation scores for both), hidden
  + FFN took no hidden channel at 20% and 35% (benchmarks/results/hidden_pruning_cpu.json), so
  that setting was FFN pruning under another name. A fixed share makes it really remove hidden
  channels, as Minitron's best width setting does (hidden size and FFN together).

Each pruned model is evaluated (WikiText-2 `wiki.test.raw`, 512-token windows, every
--eval-every-th, fp32: the protocol of the other records; held-out C4: the 8 rows after the
training rows, what `recover_loaded` measures at its start and end), recovered by distillation from
the dense model through the public API (`recover_loaded`, what `prunekit recover` runs) at the
recovery benchmark's budget (200,000 C4 tokens, 512-token rows, batch 4, seed 0) and distillation's
default settings (its learning rate, temperature 1, teacher on the fly; bf16 autocast on a GPU, fp32
on a CPU), and evaluated again. The record is rewritten after every model, so a killed run keeps
what it had; --resume skips the (ratio, setting) pairs a record already holds.

    # one H100, all nine models (about 4 minutes):
    source benchmarks/gpu_smollm2_env.sh && python3 benchmarks/hidden_recovery.py --model $MODEL \\
        --data-dir .gpu/data --device cuda --out $OUT/hidden_recovery_gpu.json
    python benchmarks/hidden_recovery.py --markdown benchmarks/results/hidden_recovery_gpu.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

SETTINGS = ("hidden", "ffn", "combined")


def hidden_width(hidden_size: int, target: float, share: float, multiple: int) -> int:
    """The combined setting's hidden size: `share` of the target from the residual stream, to the
    nearest `multiple` channels, at least one move (removing h of d channels removes h/d of all
    parameters)."""
    moves = max(1, round(share * target * hidden_size / multiple))
    return hidden_size - moves * multiple


def cut_hidden(model, structure, scores, ids, target: float, multiple: int, *, width: int | None = None):
    """Residual channels by the planner (hidden moves only, global allocation) to reach `target` of
    total parameters, or to exactly `width` channels; refit the stream's readers, then cut. Returns the plan."""
    import prunekit
    from prunekit.compensate.hidden import refit_hidden_readers
    from prunekit.plan.plan import PlanError
    from prunekit.plan.planner import PlannerSettings, make_plan

    if width is not None:  # half a move short of the width: the planner's last move lands on it
        target = (structure.hidden_size - width - multiple / 2) / structure.hidden_size
    settings = PlannerSettings(target=target, basis="total", allocation="global", prune=("hidden",),
                               hidden_multiple=multiple)
    plan = make_plan(structure, scores, settings, comparable=False)
    kept = len(plan.keep_hidden) if plan.keep_hidden is not None else structure.hidden_size
    if width is not None and kept != width:
        raise PlanError(f"the planner kept {kept} hidden channels where {width} were asked; the model's parameters "
                        "are not linear in its hidden size (biases?): give --hidden-share as a hidden width instead")
    refit_hidden_readers(model, plan, ids, progress=False)
    prunekit.apply_plan(model, plan)
    return plan


def default_prune(model, tokenizer, ids, target: float, structures: tuple[str, ...], multiple: int) -> dict:
    """`prunekit prune --target T --basis total` with `structures` (the default's other settings)."""
    from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded

    settings = PruneSettings(target=target, basis="total", prune=structures, ffn_multiple=multiple,
                             calibration=CalibrationSettings(n_samples=ids.shape[0], seq_len=ids.shape[1]))
    prune_loaded(model, tokenizer, settings, progress=False, calibration=(ids, None))
    return {k: getattr(settings, k) for k in ("criterion", "allocation", "prune", "compensation")}


def build(setting: str, dense, tokenizer, ids, scores, ratio: float, args) -> tuple[torch.nn.Module, dict]:
    """A pruned copy of `dense` in `setting` at `ratio` of total parameters, and what was done."""
    import prunekit

    structure = prunekit.model_structure(dense)
    model = copy.deepcopy(dense)
    if setting == "hidden":
        cut_hidden(model, structure, scores, ids, ratio, args.multiple)
        return model, {"criterion": "activation", "allocation": "global", "prune": ["hidden"],
                       "compensation": "refit_hidden_readers"}
    if setting == "ffn":
        return model, default_prune(model, tokenizer, ids, ratio, ("channel",), args.multiple)
    width = hidden_width(structure.hidden_size, ratio, args.hidden_share, args.multiple)
    cut_hidden(model, structure, scores, ids, ratio, args.multiple, width=width)
    rest = 1 - (1 - ratio) * structure.total_params / prunekit.model_structure(model).total_params
    done = default_prune(model, tokenizer, ids, rest, args.combined_structures, args.multiple)
    return model, {"hidden_first": {"width": width, "criterion": "activation", "compensation": "refit_hidden_readers"},
                   "rest_target_of_the_narrower_model": round(rest, 6), "then": done}


def units(model) -> dict:
    from prunekit.pipeline import unit_counts
    from prunekit.models.structure import model_structure

    structure = model_structure(model)
    # snake_case keys: the docs' figure references name them in a path
    return {"hidden": structure.hidden_size,
            **{key.replace(" ", "_").lower(): value for key, value in unit_counts(structure).items()}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5", help="fractions of total parameters")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"any of {','.join(SETTINGS)}")
    parser.add_argument("--hidden-share", type=float, default=0.5,
                        help="combined: the share of the target taken from the hidden size")
    parser.add_argument("--combined-structures", default="channel,head",
                        help="combined: what the default prune removes after the hidden size")
    parser.add_argument("--multiple", type=int, default=64, help="hidden and FFN moves")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=16, help="WikiText-2: every n-th 512-token window")
    parser.add_argument("--tokens", type=int, default=200_000, help="distillation budget per model")
    parser.add_argument("--seq-len", type=int, default=512, help="distillation rows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=8, help="C4 rows after the training rows, for held-out perplexity")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where pruning, training and evaluation run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", action="store_true", help="keep the record at --out and skip the models it holds")
    parser.add_argument("--markdown", type=Path, metavar="RECORD",
                        help="print BENCHMARKS.md's table of RECORD, figure references included, and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        return args
    if args.out is None:
        parser.error("--out is required (the record, rewritten after every model)")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios takes fractions such as 0.2,0.35, got {args.ratios!r}")
    if not all(0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios are fractions of the total parameters, between 0 and 1; got {args.ratios}")
    args.settings = args.settings.split(",")
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    args.combined_structures = tuple(args.combined_structures.split(","))
    if not 0 < args.hidden_share < 1:
        parser.error(f"--hidden-share is a share of the target, between 0 and 1; got {args.hidden_share}")
    if args.resume and not args.out.is_file():
        parser.error(f"--resume continues the record at {args.out}, and there is none; drop --resume")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    from prunekit.recover import RecoveryError

    try:
        recovery_settings(args).validate()
    except RecoveryError as error:
        parser.error(f"recovery: {error}")
    return args


def recovery_settings(args):
    from prunekit.recover import RecoveryData, RecoverySettings

    data = RecoveryData(source="c4", seq_len=args.seq_len, held_out=args.held_out, data_dir=args.data_dir)
    return RecoverySettings(method="distill", tokens=args.tokens, batch_size=args.batch_size, data=data,
                            eval_every=0, checkpoint_every=0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text()), args.markdown.name))
        return 0
    import prunekit
    from prunekit.data import calibration_tokens
    from prunekit.evaluate.perplexity import perplexity
    from prunekit.export.files import atomic_write_text
    from prunekit.export.huggingface import versions
    from prunekit.plan.planner import removed_fraction
    from prunekit.recover import recover_loaded, recovery_rows
    from prunekit.recover.train import held_out_perplexity
    from prunekit.score import score_model

    started = time.perf_counter()
    settings = recovery_settings(args)
    dense, tokenizer = prunekit.load(args.model, dtype="float32", device=args.device)
    device = next(dense.parameters()).device
    ids = calibration_tokens("c4", tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0,
                             data_dir=args.data_dir)
    structure = prunekit.model_structure(dense)

    def wikitext(model) -> float:
        return round(perplexity(model, tokenizer, dataset="wikitext2", split="test", seq_len=512,
                                window_every=args.eval_every, protocol="raw", batch_size=4, data_dir=args.data_dir,
                                progress=False).perplexity, 3)

    if args.resume:
        record = json.loads(args.out.read_text())
        record.setdefault("previous_commands", []).append(record["command"])
        record["command"] = " ".join(sys.argv)
    else:
        # the held-out rows of every recovery: the last of the rows `recover_loaded` draws
        steps = settings.tokens // settings.data.seq_len // settings.batch_size
        rows, labels = recovery_rows(settings.data, tokenizer, steps * settings.batch_size)
        held = slice(len(rows) - settings.data.held_out, None)
        record = {
            "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "device": str(device), "versions": versions(),
            "protocol": {
                "calibration": f"c4, {args.calib_samples} x {args.calib_seq_len} tokens, seed 0",
                "eval": f"wikitext2 raw test, 512-token windows, every {args.eval_every}th, fp32; held-out c4: "
                        f"{settings.data.held_out} rows of {settings.data.seq_len} after the training rows",
                "recovery": {**settings.to_dict(), "lr": settings.learning_rate},
                "hidden_share": args.hidden_share, "combined_structures": list(args.combined_structures),
                "multiple": args.multiple},
            "dense": {"params": structure.total_params, "wikitext2": wikitext(dense),
                      "held_out_c4": round(held_out_perplexity(dense, rows[held], labels[held], settings.batch_size,
                                                               device), 4) if settings.data.held_out else None},
            "runs": []}
        print(f"dense: wikitext2 {record['dense']['wikitext2']}  held-out c4 {record['dense']['held_out_c4']}", flush=True)
    done = {(run["ratio"], run["setting"]) for run in record["runs"]}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")

    save()
    scores = None
    for ratio in args.ratios:
        for setting in args.settings:
            if (ratio, setting) in done:
                continue
            began = time.perf_counter()
            if scores is None and setting in ("hidden", "combined"):
                scores = score_model(dense, "activation", ids, progress=False)
            model, how = build(setting, dense, tokenizer, ids, scores, ratio, args)
            after = prunekit.model_structure(model)
            run = {"ratio": ratio, "setting": setting, "how": how, "units": units(model),
                   "removed_total": round(removed_fraction(structure, after, "total"), 5),
                   "removed_non_embedding": round(removed_fraction(structure, after, "non-embedding"), 5),
                   "params": after.total_params, "prune_seconds": round(time.perf_counter() - began, 1),
                   "pruned": {"wikitext2": wikitext(model)}}
            model, trained = recover_loaded(model, tokenizer, settings, teacher=dense, progress=False)
            run["pruned"]["held_out_c4"] = trained["eval"][0][1] if trained["eval"] else None
            run["recovered"] = {"wikitext2": wikitext(model),
                                "held_out_c4": trained["eval"][-1][1] if trained["eval"] else None}
            gap = run["pruned"]["wikitext2"] - record["dense"]["wikitext2"]
            run["gap_closed"] = round((run["pruned"]["wikitext2"] - run["recovered"]["wikitext2"]) / gap, 4)
            run["recovery"] = {k: trained.get(k) for k in ("total_steps", "tokens", "train_seconds", "tokens_per_second",
                                                           "precision", "peak_gpu_gib")}
            run["recovery"]["loss_first_last"] = [trained["loss"][0], trained["loss"][-1]]
            run["seconds"] = round(time.perf_counter() - began, 1)
            record["runs"].append(run)
            record["seconds"] = round(time.perf_counter() - started, 1)
            save()
            print(f"{ratio} {setting:8s} hidden {run['units']['hidden']}  removed {run['removed_total']:.3f}  "
                  f"wikitext2 {run['pruned']['wikitext2']} -> {run['recovered']['wikitext2']}  "
                  f"held-out c4 {run['pruned']['held_out_c4']} -> {run['recovered']['held_out_c4']}  "
                  f"({run['seconds']} s)", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


STRUCTURE_LABELS = {"channel": "FFN", "head": "heads", "kv_group": "KV groups", "attention": "attention sublayers",
                    "mlp": "MLP sublayers", "layer": "layers"}


def label(setting: str, record: dict) -> str:
    if setting == "hidden":
        return "hidden alone (refit)"
    if setting == "ffn":
        return "FFN (the default)"
    return " + ".join(["hidden"] + [STRUCTURE_LABELS.get(s, s) for s in record["protocol"]["combined_structures"]])


def markdown(record: dict, name: str) -> str:
    """BENCHMARKS.md's table of a record, every figure with its docs-check reference to `name`."""
    dense = record["dense"]
    recovery = record["protocol"]["recovery"]
    lines = [f"Dense: WikiText-2 {dense['wikitext2']:.2f}, held-out C4 {dense['held_out_c4']:.2f}; "
             f"{record['machine']}, {record['date']}. <!-- fig {dense['wikitext2']:.2f}@{name}#dense/wikitext2; "
             f"{dense['held_out_c4']:.2f}@{name}#dense/held_out_c4 -->", "",
             "| removed (total) | setting | hidden | query heads | FFN channels | WikiText-2: pruned | recovered "
             "| gap closed | held-out C4: pruned -> recovered |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(record["runs"]):
        at = f"{name}#runs/{i}"
        u, pruned, recovered = run["units"], run["pruned"], run["recovered"]
        cells = [f"{100 * run['ratio']:g}% ({100 * run['removed_total']:.1f}%)", label(run["setting"], record),
                 str(u["hidden"]), str(u["query_heads"]), f"{u['ffn_channels']:,}", f"{pruned['wikitext2']:.2f}",
                 f"**{recovered['wikitext2']:.2f}**", f"{100 * run['gap_closed']:.0f}%",
                 f"{pruned['held_out_c4']:.1f} -> {recovered['held_out_c4']:.1f}"]
        refs = [f"{100 * run['ratio']:g}@-", f"{100 * run['removed_total']:.1f}@100*{{{at}/removed_total}}",
                f"{u['hidden']}@{at}/units/hidden", f"{u['query_heads']}@{at}/units/query_heads",
                f"{u['ffn_channels']:,}@{at}/units/ffn_channels", f"{pruned['wikitext2']:.2f}@{at}/pruned/wikitext2",
                f"{recovered['wikitext2']:.2f}@{at}/recovered/wikitext2",
                f"{100 * run['gap_closed']:.0f}@100*{{{at}/gap_closed}}",
                f"{pruned['held_out_c4']:.1f}@{at}/pruned/held_out_c4",
                f"{recovered['held_out_c4']:.1f}@{at}/recovered/held_out_c4"]
        lines.append("| " + " | ".join(cells) + " | <!-- fig " + "; ".join(refs) + " -->")
    first = record["runs"][0]["recovery"]
    every = ", ".join(f"{{{name}#runs/{i}/seconds}}" for i in range(len(record["runs"])))
    if len(record["runs"]) == 1:  # min() and max() of docs-check take two or more
        every = f"{every}, {every}"
    seconds = [run["seconds"] for run in record["runs"]]
    lines += ["", f"Distillation from the dense model at lr {recovery['lr']:g} on {first['tokens']:,} C4 tokens "
                  f"({first['total_steps']} steps of {recovery['batch_size']} x {recovery['data']['seq_len']}), "
                  f"{first['precision']}; pruning, recovery and both evaluations took {min(seconds):.0f}-"
                  f"{max(seconds):.0f} s a model. <!-- fig {recovery['lr']:g}@-; {first['tokens']:,}@{name}#runs/0/recovery/tokens; "
                  f"{first['total_steps']}@{name}#runs/0/recovery/total_steps; {recovery['batch_size']}@-; "
                  f"{recovery['data']['seq_len']}@-; {min(seconds):.0f}@min({every}); {max(seconds):.0f}@max({every}) -->",
              "", f"`{record['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
