"""Where the time of a default prune goes: wall time and peak memory of each stage of
`prunekit prune MODEL --target T` (load, calibration, scoring, planning, compensation, cut, save),
run stage by stage through the same public functions the pipeline calls, and optionally the
WikiText-2 perplexity of the result and its plan, so that a faster path can be checked against
the plan and quality it must keep.

    python benchmarks/profile_prune.py --json benchmarks/results/profile_cpu_after.json --eval
    python benchmarks/profile_prune.py --calib-samples 16 --json ...   # a quick run; the record
        # extrapolates scoring per batch and compensation per row to the default 128 rows

Peak memory is the resident set size of the process, sampled every 20 ms, per stage; the memory
estimate that `prunekit prune` checks before loading is printed beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from prunekit.compensate import compensate_sequential
from prunekit.export.huggingface import save_model, versions
from prunekit.models.loading import load, load_skeleton, load_tokenizer, resolve_model_source
from prunekit.models.memory import pruning_estimate
from prunekit.models.structure import model_structure
from prunekit.pipeline import CalibrationSettings, PruneSettings, calibration_batch
from prunekit.plan.planner import make_plan
from prunekit.prune.surgery import apply_plan
from prunekit.score import get_criterion, score_model


# Gemma 3 270M's text config: a 262,144-token vocabulary on a 640-wide model, the case whose
# full logits (4.3 GB per batch of 8 x 512 in float32) did not fit a 24 GB machine.
# SmolLM2-135M's shape: the default model, for timings on a machine without its GGUF file.
RANDOM_SHAPES = {"smollm2-135m": ("llama", dict(
    vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100_000.0,
    tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)),
    "gemma3-270m": ("gemma3_text", dict(
    vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, sliding_window=512,
    query_pre_attn_scalar=256, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1))}


def random_model(shape: str, device: str):
    """A model of `shape` (RANDOM_SHAPES) with transformers' random initialisation, on `device`
    (built there, not on the meta device: Gemma's embedding scale is a buffer that filling the
    parameters alone would leave uninitialised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family, config = RANDOM_SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config), dtype=torch.float32)
    return model.eval()


class PeakRSS:
    """The process's peak resident set size over a block, sampled by a thread (ru_maxrss only rises)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _sync(device: str | None) -> None:
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


def plan_summary(plan_dict: dict) -> dict[str, dict]:
    """Per pruned layer: how many query heads and FFN channels it keeps (the record also holds the
    whole plan, for exact comparisons)."""
    return {index: {k: len(v) for k, v in layer.items() if isinstance(v, list)}
            for index, layer in plan_dict.get("layers", {}).items()}


def held_out_c4_stream(tokenizer, data_dir: str | None, *, seq_len: int, seeds=range(5)) -> torch.Tensor:
    """Token ids of the C4 documents that calibration with any of `seeds` never reads: the
    calibration walks the documents in a seeded random order and takes the first long-enough
    ones, so this walks the same order (data/calibration.py) and leaves out every document visited."""
    from prunekit.data import encode_text, join_documents, load_texts

    texts = load_texts("c4", data_dir=data_dir)
    visited: set[int] = set()
    for seed in seeds:
        generator, found = torch.Generator().manual_seed(seed), 0
        for index in torch.randperm(len(texts), generator=generator).tolist():
            visited.add(index)
            # seq_len >= the calibration's window (seq_len less BOS): at least the documents it visits
            if len(encode_text(tokenizer, texts[index])) >= seq_len:
                found += 1
                if found == CalibrationSettings().n_samples:
                    break
    kept = [text for i, text in enumerate(texts) if i not in visited]
    return torch.tensor(encode_text(tokenizer, join_documents(kept)), dtype=torch.long)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the CPU)")
    parser.add_argument("--calib-samples", type=int, default=None, help="default: PruneSettings' (128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criterion-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR"))
    parser.add_argument("--eval", action="store_true", help="WikiText-2 perplexity of the result (512-token windows, "
                        "every 16th, fp32), not part of the prune's time")
    parser.add_argument("--held-out-windows", type=int, default=0, help="with --eval: also the perplexity of this many "
                        "512-token windows of the C4 documents that calibration (seeds 0-4) never draws from")
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                        help="prune a model of this shape with random weights, built in memory (the 'load' stage), "
                        "tokenized with --model's tokenizer: memory and time do not depend on the values")
    parser.add_argument("--tokenizer", default=None, help="with --random-shape: a tokenizer directory "
                        "(default: --model's tokenizer)")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    defaults = PruneSettings()
    calibration = replace(CalibrationSettings(), data_dir=args.data_dir, seed=args.seed,
                          **({"n_samples": args.calib_samples} if args.calib_samples else {}))
    options = dict(option.split("=", 1) for option in args.criterion_option)
    settings = replace(defaults, target=args.target, calibration=calibration, device=args.device,
                       criterion_options=options)
    settings.validate()
    criterion = get_criterion(settings.criterion)
    stages: dict[str, dict] = {}

    @contextmanager
    def stage(name: str):
        _sync(args.device)
        if args.device and args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with PeakRSS() as rss:
            yield
            _sync(args.device)
        # The 1-minute load average at the end: above the cores of this process's threads, another
        # job shared the CPU and the seconds are inflated.
        record = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_gib": round(rss.peak / 2**30, 3),
                  "load_average": round(os.getloadavg()[0], 2)}
        if args.device and args.device.startswith("cuda"):
            record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        stages[name] = record
        print(f"[{name}] {record}", file=sys.stderr, flush=True)

    if args.random_shape:
        family, config = RANDOM_SHAPES[args.random_shape]
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            structure = model_structure(AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config)))
    else:
        structure = model_structure(load_skeleton(resolve_model_source(args.model)))
    estimate = pruning_estimate(structure, args.dtype, gradients=criterion.needs_gradients,
                                batch_size=settings.batch_size, seq_len=calibration.seq_len,
                                n_samples=calibration.n_samples, cached_layers=1)
    baseline_rss = PeakRSS().current()
    total_started = time.perf_counter()
    with stage("load"):
        if args.random_shape:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else load_tokenizer(args.model)
            model = random_model(args.random_shape, args.device or "cpu")
            model.to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
        else:
            model, tokenizer = load(args.model, dtype=args.dtype, device=args.device or "cpu")
    with stage("calibration"):
        ids, labels = calibration_batch(model, tokenizer, calibration)
    with stage("scoring"):
        scores = score_model(model, settings.criterion, ids, labels, batch_size=settings.batch_size,
                             device=settings.device, **settings.criterion_options)
    with stage("planning"):
        plan = make_plan(model_structure(model), scores, settings.planner_settings(), comparable=criterion.comparable)
    with stage("compensation"):
        report = compensate_sequential(model, plan, ids, ridge=settings.ridge, batch_size=settings.batch_size,
                                       device=settings.device)
    with stage("cut"):
        apply_plan(model, plan)
    with tempfile.TemporaryDirectory() as tmp, stage("save"):
        model.to("cpu")
        save_model(model, tokenizer, Path(tmp) / "pruned", plan=plan, source=str(args.model))
    total = time.perf_counter() - total_started

    rows, default_rows = calibration.n_samples, CalibrationSettings().n_samples
    record = {
        "label": args.label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/profile_prune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
                   + (f", {torch.cuda.get_device_name()}" if args.device and args.device.startswith("cuda") else ""),
        "versions": versions(),
        "model": args.random_shape and f"{args.random_shape} (random weights)" or args.model, "target": args.target, "dtype": args.dtype, "device": args.device or "cpu",
        "calibration": f"{calibration.source} {rows} x {calibration.seq_len}, seed {calibration.seed}",
        "criterion": settings.criterion, "criterion_options": scores.meta.get("options", {}),
        "stages": stages, "total_seconds": round(total, 1),
        "memory": {"estimate_gib": round(estimate.total / 2**30, 3), "estimate_parts_gib":
                   {k: round(v / 2**30, 3) for k, v in estimate.parts.items()},
                   "process_rss_before_load_gib": round(baseline_rss / 2**30, 3),
                   "peak_rss_gib": max(s["peak_rss_gib"] for s in stages.values())},
        "removed_fraction": round(1 - model_structure(model).non_embedding_params / structure.non_embedding_params, 5),
        "plan_widths": plan_summary(plan.to_dict()),
        "plan": plan.to_dict(),
        "compensation_error_after_mean": round(sum(f.error_after for f in report.fits) / max(len(report.fits), 1), 5),
    }
    if rows != default_rows:
        # Scoring and compensation are linear in the rows; load, planning, cut and save are not.
        fixed = sum(stages[s]["seconds"] for s in ("load", "calibration", "planning", "cut", "save"))
        scaled = {s: round(stages[s]["seconds"] * default_rows / rows, 1) for s in ("scoring", "compensation")}
        record["extrapolated_to_default_rows"] = {"rows": default_rows, **scaled,
                                                  "total_seconds": round(fixed + sum(scaled.values()), 1)}
    if args.eval:
        from prunekit.evaluate.perplexity import perplexity

        started = time.perf_counter()
        wiki = perplexity(model, tokenizer, dataset="wikitext2", seq_len=512, window_every=16, data_dir=args.data_dir,
                          progress=False)
        record["wikitext2_ppl"] = round(wiki.perplexity, 3)
        record["eval_protocol"] = "WikiText-2 wiki.test.raw as it is, 512-token windows, every 16th (37), fp32"
        if args.held_out_windows:
            stream = held_out_c4_stream(tokenizer, args.data_dir, seq_len=calibration.seq_len)
            held = perplexity(model, tokenizer, dataset=stream, seq_len=512, max_windows=args.held_out_windows,
                              progress=False)
            record["c4_held_out_ppl"] = round(held.perplexity, 3)
            record["c4_held_out_protocol"] = (f"C4 documents no calibration of seeds 0-4 ({default_rows} x "
                                              f"{calibration.seq_len}) draws from, joined, first {held.n_windows} "
                                              "windows of 512, fp32")
        record["eval_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in record.items() if k not in ("plan", "plan_widths")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
