"""The evaluation and speed jobs behind `prunekit eval` and `prunekit bench`, one function each.

Both check every name and option, read every data file, tokenize every text and check that it holds
at least one window before any weight is loaded, so a typo costs seconds, not a model load. Both
return a JSON-ready report holding every figure with the protocol that produced it (model, dtype,
windows, tokens, seconds, versions, machine); `format_eval_table` and `format_bench_table` render a
report, fresh or read back from its JSON file.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from prunekit.data import DataError, adds_bos_by_default, encode_text, join_documents, load_texts, resolve_split
from prunekit.evaluate.perplexity import perplexity, plan_windows
from prunekit.evaluate.speed import (
    DEVICES,
    decode_mode,
    ModelSpeed,
    SpeedResult,
    SpeedSettings,
    Spread,
    benchmark_speed,
    format_speed_table,
)
from prunekit.evaluate.tasks import LOCAL_TASKS, EvalError, evaluate_tasks, local_data_files
from prunekit.export.files import atomic_write_text
from prunekit.export.huggingface import versions as library_versions
from prunekit.models.loading import ModelSource, load, load_config, load_skeleton, load_tokenizer, resolve_model_source
from prunekit.models.memory import PeakMemory, describe_peak, inference_estimate
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.preflight import Need, Preflight

log = logging.getLogger(__name__)

EVAL_FORMAT = "prunekit.eval/1"
BENCH_FORMAT = "prunekit.bench/1"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEFAULT_PPL = "wikitext2"


# ----------------------------------------------------------------------------- shared checks


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalError(f"{name} must be an integer >= {minimum}, got {value!r}; pass a value of at least {minimum}.")


def _distinct_items(kind: str, items: Sequence[Any]) -> list[Any]:
    if isinstance(items, str):
        raise EvalError(f"{kind} must be a list, got the string {items!r}; write [{items!r}].")
    items = list(items)
    repeated = [item for index, item in enumerate(items) if item in items[:index]]
    if repeated:
        raise EvalError(f"{kind} lists {repeated[0]!r} more than once; list each once.")
    return items


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise EvalError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda' was asked for, but torch finds no CUDA GPU here; use device 'cpu'.")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_CHOICES:
        raise EvalError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}.")


def _check_positions(source: ModelSource, needs: dict[str, int]) -> None:
    """Refuse any setting that needs more positions than the model has, reading only its config."""
    limit = getattr(load_config(source), "max_position_embeddings", None)
    for what, positions in needs.items():
        if limit is not None and positions > limit:
            raise EvalError(f"{what} needs {positions} positions but {source.spec} has {limit}; lower it.")


def _check_json_out(json_out: str | os.PathLike | None, sources: Sequence[ModelSource]) -> Path | None:
    """The results path, refused when it is a folder or lies inside a model it would damage."""
    if json_out is None:
        return None
    path = Path(json_out).expanduser()
    if path.is_dir():
        raise EvalError(f"json_out {str(path)!r} is a folder; name a file such as {str(path / 'results.json')!r}.")
    resolved = path.resolve()
    existing = next(folder for folder in resolved.parents if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise EvalError(f"json_out {str(path)!r} cannot be written: {existing} is not a writable folder; "
                        "choose another path.")
    for protected in (p.resolve() for source in sources for p in source.local_paths):
        if resolved == protected or protected in resolved.parents:
            raise EvalError(f"json_out {str(path)!r} lies inside the model at {protected}; write the results elsewhere.")
    return path


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def environment() -> dict[str, Any]:
    """When, where and with what a figure was measured: date, library versions, CPU, threads, GPU."""
    versions = library_versions()
    for package in ("tokenizers", "lm-eval"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    machine = {
        "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "machine": machine,
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _model_entry(source: ModelSource, model: torch.nn.Module, dtype: str, load_seconds: float) -> dict[str, Any]:
    return {
        "spec": source.spec,
        "source": source.kind,
        "location": source.location if source.gguf_file is None else str(Path(source.location) / source.gguf_file),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "load_seconds": round(load_seconds, 2),
    }


def _load(source: ModelSource, *, dtype: str, device: str = "cpu") -> tuple[torch.nn.Module, float]:
    """The model's weights (no tokenizer) and the seconds they took to load."""
    log.info("loading %s (%s)", source.spec, dtype)
    start = time.perf_counter()
    model, _ = load(source.spec, dtype=dtype, device=device, with_tokenizer=False)
    return model, time.perf_counter() - start


# ----------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class _TokenStream:
    """A perplexity source, read and tokenized before the model is loaded."""

    spec: str
    split: str | None
    text_sha256: str  # of the text as tokenized, to tell apart copies of a data set
    ids: torch.Tensor


def _token_stream(spec: str, tokenizer, *, seq_len: int, stride: int | None, window_every: int,
                  data_dir: str | os.PathLike | None) -> _TokenStream:
    """`spec` tokenized once without special tokens, refused when it cannot fill one window."""
    split = resolve_split(spec, None)
    text = join_documents(load_texts(spec, split=split, data_dir=data_dir))
    ids = torch.tensor(encode_text(tokenizer, text), dtype=torch.long)
    bos = adds_bos_by_default(tokenizer)
    if not plan_windows(len(ids), seq_len=seq_len, bos=bos, stride=stride, window_every=window_every):
        raise DataError(
            f"{spec} is {len(ids)} tokens long under this model's tokenizer, shorter than one window of "
            f"{seq_len - bos} tokens; lower seq_len or use a longer text."
        )
    return _TokenStream(spec, split, hashlib.sha256(text.encode("utf-8")).hexdigest(), ids)


def _check_tasks(tasks: list[str], data_dir: str | os.PathLike | None) -> None:
    """Every task is a local task with its data present, or a task in lm-eval's registry."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise EvalError(
            "zero-shot tasks need lm-evaluation-harness, which is not installed; run `pip install 'prunekit[eval]'`."
        ) from error
    registry_tasks = [task for task in tasks if task not in LOCAL_TASKS]
    if registry_tasks:
        # Indexing lm-eval's ~15k built-in configs takes seconds, so only when a name is not local.
        known = TaskManager().all_tasks
        unknown = [task for task in registry_tasks if task not in known]
        if unknown:
            raise EvalError(
                f"unknown task {unknown[0]!r}; the local tasks are {', '.join(LOCAL_TASKS)}, and any other name "
                "must be an lm-eval task (`lm-eval ls tasks`), which downloads its data from the Hub."
            )
    for task in tasks:
        if task in LOCAL_TASKS:
            local_data_files(task, data_dir)


def check_eval_options(*, ppl: Sequence[str], seq_len: int, stride: int | None, window_every: int,
                       tasks: Sequence[str], limit: int | None, dtype: str, batch_size: int, device: str,
                       data_dir: str | os.PathLike | None) -> None:
    """Every option of an evaluation that needs neither the model nor the text: names, ranges,
    the device, the task data. Raised as EvalError naming the fix."""
    ppl = _distinct_items("ppl", ppl)
    tasks = _distinct_items("tasks", tasks)
    if not ppl and not tasks:
        raise EvalError("nothing to evaluate; name text sources in ppl, tasks in tasks, or both.")
    _check_dtype(dtype)
    _check_device(device)
    _check_int("seq_len", seq_len, 2)
    _check_int("window_every", window_every, 1)
    if stride is not None:
        _check_int("stride", stride, 1)
        if stride >= seq_len:
            raise EvalError(f"stride must be below seq_len={seq_len}, got {stride}; leave stride unset for "
                            "non-overlapping windows.")
        if window_every != 1:
            raise EvalError("window_every thins non-overlapping windows, and stride makes them slide; use one of the two.")
    _check_int("batch_size", batch_size, 1)
    if limit is not None:
        _check_int("limit", limit, 1)
        if not tasks:
            raise EvalError("limit caps the examples of each task, but no task is named; add tasks or drop limit.")
    for spec in ppl:
        resolve_split(spec, None)  # every name, before any file is read
    if tasks:
        _check_tasks(tasks, data_dir)


def _prepare_evaluation(model, *, ppl, seq_len, stride, window_every, tasks, limit, dtype, batch_size, data_dir,
                        json_out, device) -> tuple[ModelSource, Any, list[_TokenStream], Path | None]:
    """Every check of an evaluation, then each text read and tokenized (and refused when it cannot
    fill one window): all before a weight is loaded."""
    check_eval_options(ppl=ppl, seq_len=seq_len, stride=stride, window_every=window_every, tasks=tasks, limit=limit,
                       dtype=dtype, batch_size=batch_size, device=device, data_dir=data_dir)
    source = resolve_model_source(model)
    json_path = _check_json_out(json_out, [source])
    if ppl:
        _check_positions(source, {"seq_len": seq_len})
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise EvalError(f"{source.spec} has no tokenizer, which text evaluation needs; use a model that ships one.")
    streams = [
        _token_stream(spec, tokenizer, seq_len=seq_len, stride=stride, window_every=window_every, data_dir=data_dir)
        for spec in ppl
    ]
    return source, tokenizer, streams, json_path


def preflight_evaluate(model: str | os.PathLike, structures: Sequence[ModelStructure], *, ppl: Sequence[str],
                       seq_len: int = 512, stride: int | None = None, window_every: int = 1,
                       tasks: Sequence[str] = (), limit: int | None = None, dtype: str = "float32",
                       batch_size: int = 8, data_dir: str | os.PathLike | None = None, device: str = "cpu",
                       extra_seconds: float = 0.0) -> Preflight:
    """An evaluation of models of these `structures` (one at a time, with `model`'s tokenizer, for a
    model that is not written yet: the original's) checked as `evaluate_model` checks it, with the
    texts tokenized: what it will need and roughly how long it takes."""
    from prunekit.pipeline import LOAD_SECONDS, rate

    _, _, streams, _ = _prepare_evaluation(
        model, ppl=ppl, seq_len=seq_len, stride=stride, window_every=window_every, tasks=tasks, limit=limit,
        dtype=dtype, batch_size=batch_size, data_dir=data_dir, json_out=None, device=device)
    tokens = sum(len(s.ids) // window_every for s in streams) + len(tasks) * (limit or 2000) * 4 * 100
    seconds = sum(LOAD_SECONDS + s.flops_per_token(seq_len) * tokens / rate(device, "infer") for s in structures)
    widest = max(structures, key=lambda s: s.total_params)
    needs = inference_estimate(widest, dtype, batch_size=batch_size, seq_len=seq_len)
    what = f"perplexity on {', '.join(ppl) or '-'}; tasks {', '.join(tasks) or '-'}"
    return Preflight("evaluate", what, seconds + extra_seconds,
                     (Need(device, needs, hints="evaluate in bfloat16 (dtype) or lower the batch size"),))


def evaluate_model(
    model: str | os.PathLike,
    *,
    ppl: Sequence[str] = (DEFAULT_PPL,),
    seq_len: int = 512,
    stride: int | None = None,
    window_every: int = 1,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    json_out: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity on each text source of `ppl` and zero-shot accuracy on each of `tasks`.

    model: a model directory, .gguf file, hub id or `smollm2-135m`; loaded once, in `dtype`, onto
        `device` (cpu or cuda).
    ppl: text sources (`wikitext2`, `c4`, `ptb`, a .txt file, FILE.jsonl[:FIELD]), each tokenized once
        without special tokens and cut into windows of `seq_len` tokens: non-overlapping with the
        remainder dropped, or sliding with `stride`; `window_every` keeps every k-th window only.
    tasks: local tasks (piqa, arc_easy, arc_challenge, hellaswag, read from `data_dir` or
        $PRUNEKIT_DATA_DIR) or lm-eval registry tasks, scored 0-shot; `limit` takes the first
        `limit` examples of each.
    json_out: also write the report there, atomically.

    Returns {"format", "model", "perplexity": {source: {...}}, "tasks": {task: {...}}, "environment"}.
    Everything that can be checked without the weights is checked before they are loaded.
    """
    source, tokenizer, streams, json_path = _prepare_evaluation(
        model, ppl=ppl, seq_len=seq_len, stride=stride, window_every=window_every, tasks=tasks, limit=limit,
        dtype=dtype, batch_size=batch_size, data_dir=data_dir, json_out=json_out, device=device)
    tasks = list(tasks)
    admitted = inference_estimate(model_structure(load_skeleton(source)), dtype, batch_size=batch_size,
                                  seq_len=seq_len).total
    with PeakMemory(device) as peak:
        loaded, load_seconds = _load(source, dtype=dtype, device=device)
        report: dict[str, Any] = {
            "format": EVAL_FORMAT,
            "model": {**_model_entry(source, loaded, dtype, load_seconds), "device": device},
            "perplexity": {},
            "tasks": {},
            "environment": environment(),
        }
        for stream in streams:
            start = time.perf_counter()
            result = perplexity(loaded, tokenizer, dataset=stream.ids, seq_len=seq_len, stride=stride,
                                window_every=window_every, batch_size=batch_size, progress=progress)
            report["perplexity"][stream.spec] = {
                "perplexity": result.perplexity,
                "mean_nll": result.mean_nll,
                "n_tokens": result.n_tokens,
                "n_windows": result.n_windows,
                "seconds": round(time.perf_counter() - start, 2),
                # The stream went in pre-tokenized; name the text it came from.
                "protocol": {**result.protocol, "dataset": stream.spec, "split": stream.split, "text_protocol": "raw",
                             "text_sha256": stream.text_sha256, "special_tokens": False, "remainder": "dropped"},
            }
        if tasks:
            report["tasks"] = evaluate_tasks(loaded, tokenizer, tasks, data_dir=data_dir, limit=limit,
                                             batch_size=batch_size)
    report["memory"] = peak.to_dict(admitted)
    _write_json(json_path, report)
    return report


def _windows_label(entry: dict[str, Any]) -> str:
    protocol = entry["protocol"]
    if protocol["stride"] is not None:
        return f"{entry['n_windows']:,}, sliding by {protocol['stride']}"
    every = protocol["window_every"]
    return f"{entry['n_windows']:,}, non-overlapping" + (f", 1 in {every}" if every > 1 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _accuracy(metrics: dict[str, Any], name: str) -> str:
    value, stderr = metrics.get(name), metrics.get(f"{name}_stderr")
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def format_eval_table(report: dict[str, Any]) -> str:
    """The figures of an `evaluate_model` report as plain-text tables, one row per source or task."""
    model = report["model"]
    lines = [f"{model['spec']} ({model['dtype']}, {model['parameters']:,} parameters)"]
    if report["perplexity"]:
        rows = []
        for name, entry in report["perplexity"].items():
            protocol = entry["protocol"]
            rows.append([
                name, protocol["split"] or "-", f"{protocol['seq_len']} tokens", _windows_label(entry),
                f"{entry['n_tokens']:,}", f"{entry['perplexity']:.2f}", f"{entry['seconds']:.1f}",
            ])
        lines += ["", *_table(["text", "split", "window", "windows", "tokens scored", "perplexity", "seconds"], rows)]
    if report["tasks"]:
        rows = [
            [task, f"{entry['n']:,}", _accuracy(entry, "acc"), _accuracy(entry, "acc_norm"), f"{entry['seconds']:.1f}"]
            for task, entry in report["tasks"].items()
        ]
        limits = {entry["protocol"]["limit"] for entry in report["tasks"].values()}
        lines += ["", *_table(["task (0-shot)", "n", "acc", "acc_norm", "seconds"], rows)]
        if limits != {None}:
            lines.append(f"limit: the first {', '.join(str(limit) for limit in limits)} examples of each task")
    memory = describe_peak(report.get("memory"))
    if memory:
        lines += ["", f"memory: {memory}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bench


def check_bench_options(*, device: str, dtype: str, prefill_batch: int, prefill_len: int,
                        decode_batches: Sequence[int], decode_context: int, decode_tokens: int, warmup: int | None,
                        repeats: int, use_compile: bool, decode: str | None = None) -> int:
    """Every option of a timing run that needs no model; returns the number of warm-up calls."""
    _check_dtype(dtype)
    _check_device(device)
    decode_mode(decode, device)
    warmup = (2 if use_compile else 1) if warmup is None else warmup
    for name, value, minimum in [("prefill_batch", prefill_batch, 1), ("prefill_len", prefill_len, 1),
                                 ("decode_context", decode_context, 1), ("decode_tokens", decode_tokens, 2),
                                 ("warmup", warmup, 0), ("repeats", repeats, 1)]:
        _check_int(name, value, minimum)
    decode_batches = _distinct_items("decode_batches", decode_batches)
    if not decode_batches:
        raise EvalError("decode_batches is empty; name at least one batch size, e.g. [1, 16].")
    for batch in decode_batches:
        _check_int("each of decode_batches", batch, 1)
    if use_compile and warmup < 2:
        raise EvalError("use_compile needs two untimed calls to compile and settle; set warmup >= 2.")
    return warmup


def preflight_bench(model: str | os.PathLike, structures: Sequence[ModelStructure], *, device: str = "cpu",
                    dtype: str = "bfloat16", prefill_batch: int = 8, prefill_len: int = 512,
                    decode_batches: Sequence[int] = (1, 16), decode_context: int = 128, decode_tokens: int = 64,
                    warmup: int | None = None, repeats: int = 5, use_compile: bool = False,
                    decode: str | None = None) -> Preflight:
    """A timing run of models of these `structures` side by side (all loaded at once), checked as
    `bench_models` checks it, against `model`'s positions."""
    from prunekit.pipeline import LOAD_SECONDS, rate

    warmup = check_bench_options(device=device, dtype=dtype, prefill_batch=prefill_batch, prefill_len=prefill_len,
                                 decode_batches=decode_batches, decode_context=decode_context,
                                 decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, use_compile=use_compile,
                                 decode=decode)
    _check_positions(resolve_model_source(model), {"prefill_len": prefill_len,
                                                   "decode_context + decode_tokens": decode_context + decode_tokens})
    tokens = (repeats + warmup) * (prefill_batch * prefill_len + sum(decode_batches) * decode_tokens * 20)
    seconds = sum(LOAD_SECONDS + s.flops_per_token(prefill_len) * tokens / rate(device, "infer") for s in structures)
    widest = max(structures, key=lambda s: s.total_params)
    needs = inference_estimate(widest, dtype, batch_size=max(prefill_batch, *decode_batches), seq_len=prefill_len,
                               models=len(structures))
    what = f"speed on {device}" + (", beside the original" if len(structures) > 1 else "")
    return Preflight("bench", what, seconds, (Need(device, needs, hints="lower prefill_batch or prefill_len"),))


def bench_models(
    model: str | os.PathLike,
    *,
    baseline: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
    prefill_batch: int = 8,
    prefill_len: int = 512,
    decode_batches: Sequence[int] = (1, 16),
    decode_context: int = 128,
    decode_tokens: int = 64,
    warmup: int | None = None,
    repeats: int = 5,
    use_compile: bool = False,
    json_out: str | os.PathLike | None = None,
    decode: str | None = None,
) -> dict[str, Any]:
    """Inference speed of `model`, and of `baseline` interleaved with it in the same process.

    Prefill throughput on `prefill_batch` x `prefill_len` tokens; greedy KV-cache decode of
    `decode_tokens` tokens after a `decode_context`-token prompt at each of `decode_batches`; time
    to first token; peak memory. With a baseline, each figure's measured speedup sits beside the
    ideal one (the ratio of FLOPs per token). `warmup` defaults to 1 untimed call, 2 with `use_compile`.
    `decode` (speed.DECODE_MODES) defaults to CUDA-graph replay over a static cache on a GPU, eager on the CPU.

    Returns {"format", "model", "baseline", "speed": SpeedResult.to_dict(), "environment"}; every
    option is checked before a weight is loaded.
    """
    warmup = check_bench_options(device=device, dtype=dtype, prefill_batch=prefill_batch, prefill_len=prefill_len,
                                 decode_batches=decode_batches, decode_context=decode_context,
                                 decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, use_compile=use_compile,
                                 decode=decode)
    decode_batches = list(decode_batches)
    sources = {"model": resolve_model_source(model)}
    if baseline is not None:
        sources["baseline"] = resolve_model_source(baseline)
    json_path = _check_json_out(json_out, list(sources.values()))
    for source in sources.values():
        _check_positions(source, {"prefill_len": prefill_len,
                                  "decode_context + decode_tokens": decode_context + decode_tokens})

    loaded = {name: _load(source, dtype=dtype, device=device) for name, source in sources.items()}
    result = benchmark_speed(
        loaded["model"][0], baseline=loaded["baseline"][0] if baseline is not None else None, device=device,
        dtype=dtype, prefill_batch=prefill_batch, prefill_len=prefill_len, decode_batches=tuple(decode_batches),
        decode_context=decode_context, decode_tokens=decode_tokens, warmup=warmup, repeats=repeats,
        use_compile=use_compile, decode=decode,
    )
    entries = {name: _model_entry(sources[name], module, dtype, seconds) for name, (module, seconds) in loaded.items()}
    report = {
        "format": BENCH_FORMAT,
        "model": entries["model"],
        "baseline": entries.get("baseline"),
        "speed": result.to_dict(),
        "environment": environment(),
    }
    _write_json(json_path, report)
    return report


def _speed_result(speed: dict[str, Any]) -> SpeedResult:
    """A SpeedResult back from its `to_dict()` form (as a report holds it, or as JSON gave it back)."""

    def model_speed(entry: dict[str, Any] | None) -> ModelSpeed | None:
        if entry is None:
            return None
        return ModelSpeed(**{**entry, "timings": {k: Spread(**v) for k, v in entry["timings"].items()}})

    settings = speed["settings"]
    return SpeedResult(
        settings=SpeedSettings(**{**settings, "decode_batches": tuple(settings["decode_batches"])}),
        model=model_speed(speed["model"]),
        baseline=model_speed(speed["baseline"]),
        speedup=None if speed["speedup"] is None else {k: Spread(**v) for k, v in speed["speedup"].items()},
        ideal_speedup=speed["ideal_speedup"],
        ideal_basis=speed["ideal_basis"],
    )


def format_bench_table(report: dict[str, Any]) -> str:
    """A `bench_models` report as a table: each metric for the model, and beside it the baseline's,
    the measured speedup and the ideal one."""
    names = f"model: {report['model']['spec']}"
    if report["baseline"] is not None:
        names += f"; baseline: {report['baseline']['spec']}"
    return f"{names}\n\n{format_speed_table(_speed_result(report['speed']))}"
