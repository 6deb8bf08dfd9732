"""Inference speed of a causal LM, alone or side by side with a baseline.

Measures prefill throughput, KV-cache decode throughput at a few batch sizes, time to first token
and peak memory, each over several repeats after a warm-up. With a baseline, the two models run
interleaved (A, B, A, B, ...) in one process, so drifting clocks and a busy machine hit both alike,
and every metric is reported as the median and range of its repeats. A speedup is the ratio of the
two medians the table shows, its range the ratio of their ranges crossed (the slowest repeat of
one against the fastest of the other), so a reader can form every figure from the table.

Decode is timed one of two ways (`DECODE_MODES`), named in every table: `graph`, the default on a
GPU, fills a static KV cache with the prompt and replays each decode step from a CUDA graph captured
once, as GPU_BENCHMARKS.md and benchmarks/gpu_speed.py time it (eager decoding on a GPU is bound by
kernel launches, so it hides what pruning saves: a 25%-pruned 8B model decoded eagerly at batch 1
measured slower than the dense one); `eager`, the only way on the CPU, runs transformers' `generate`.

On a busy machine the repeats scatter and a ratio can come out as anything: a row whose repeats
spread more than `WIDE_SPREAD` of their median, or whose speedup exceeds the FLOPs ideal by more
than its own range, is marked unreliable with the reason instead of being shown as a result; the
machine's load average at the start is recorded beside the figures.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.loading import TORCH_DTYPES as DTYPES
from prunekit.evaluate.tasks import EvalError

DEVICES = ("cpu", "cuda")
DECODE_MODES: dict[str, str] = {
    "graph": "static KV cache, each step replayed from a CUDA graph",
    "eager": "transformers' generate, dynamic KV cache, kernels launched one by one",
}
MEMORY_METHODS: dict[str, str] = {
    "cuda": "weights + torch.cuda.max_memory_allocated above the allocation before each call",
    "cpu": "weights + peak RSS above the RSS before each call (VmHWM, reset through /proc/self/clear_refs)",
}
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")

Measured = dict[str, float]  # metric name -> its value in one timed call
# Repeats that spread more than this share of their median say more about the machine than the model:
# on a quiet 2-core CPU they stay within about 10% (BENCHMARKS.md), on a busy one they pass 30%.
WIDE_SPREAD = 0.25
# A speedup above the FLOPs ideal by less than this share of it is within what caches and kernels explain.
IDEAL_TOLERANCE = 0.05


@dataclass(frozen=True)
class Spread:
    """Median and range of one metric over the repeats."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class SpeedSettings:
    device: str
    dtype: str
    prefill_batch: int
    prefill_len: int
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_tokens: int
    warmup: int
    repeats: int
    use_compile: bool
    seed: int
    memory_method: str
    # os.getloadavg() (1, 5, 15 minutes) and the CPU count when the measuring started; None where unknown
    load_average: tuple[float, float, float] | None = None
    cpu_count: int | None = None
    decode: str = "eager"  # one of DECODE_MODES (records made before the choice existed decoded eagerly)

    def load_note(self) -> str | None:
        if self.load_average is None:
            return None
        cores = f" on {self.cpu_count} CPU cores" if self.cpu_count else ""
        busy = " (busy)" if self.cpu_count and self.load_average[0] > 0.75 * self.cpu_count else ""
        return f"load average at the start: {self.load_average[0]:.2f}{cores}{busy}"


@dataclass(frozen=True)
class ModelSpeed:
    """One model's measurements; `timings` maps each metric of `metric_names(settings)` to its spread."""

    timings: dict[str, Spread]
    peak_memory_mib: float | None
    parameters: int
    flops_per_token: float | None = None


@dataclass(frozen=True)
class SpeedResult:
    settings: SpeedSettings
    model: ModelSpeed
    baseline: ModelSpeed | None = None
    # Per metric, `speedup_of` the two models' timings: the ratio of the medians, oriented so that
    # > 1 means the model is faster (for times, baseline / model), with the crossed range.
    speedup: dict[str, Spread] | None = None
    ideal_speedup: float | None = None
    ideal_basis: str | None = None

    def unreliable(self) -> dict[str, str]:
        """Metric -> why its comparison cannot be trusted, for the rows `unreliable_reason` flags."""
        if self.baseline is None:
            reasons = {metric: unreliable_reason(spread, None, None, None) for metric, spread in self.model.timings.items()}
        else:
            reasons = {metric: unreliable_reason(self.model.timings[metric], self.baseline.timings[metric],
                                                 speedup_of(metric, self.model.timings[metric],
                                                            self.baseline.timings[metric]), self.ideal_speedup)
                       for metric in self.model.timings}
        return {metric: reason for metric, reason in reasons.items() if reason}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unreliable": self.unreliable()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedResult:
        """A SpeedResult back from `to_dict()` (or its JSON); records written before the load and the
        reliability were kept read as they are."""

        def model_speed(entry: dict[str, Any] | None) -> ModelSpeed | None:
            if entry is None:
                return None
            return ModelSpeed(**{**entry, "timings": {k: Spread(**v) for k, v in entry["timings"].items()}})

        settings = dict(data["settings"])
        settings["decode_batches"] = tuple(settings["decode_batches"])
        if settings.get("load_average") is not None:
            settings["load_average"] = tuple(settings["load_average"])
        model, baseline = model_speed(data["model"]), model_speed(data.get("baseline"))
        # formed again from the timings: older records kept the median of per-repeat ratios instead
        speedup = None if baseline is None else {
            metric: speedup_of(metric, model.timings[metric], baseline.timings[metric]) for metric in model.timings}
        return cls(settings=SpeedSettings(**settings), model=model, baseline=baseline, speedup=speedup,
                   ideal_speedup=data.get("ideal_speedup"), ideal_basis=data.get("ideal_basis"))


def relative_spread(spread: Spread) -> float:
    return (spread.high - spread.low) / spread.median if spread.median else float("inf")


def speedup_of(metric: str, model: Spread, baseline: Spread) -> Spread:
    """How much faster the model is than the baseline, from the two spreads as a table shows them:
    the ratio of the medians, and the slowest against the fastest repeat each way as its range."""
    if _is_time(metric):
        return Spread(baseline.median / model.median, baseline.low / model.high, baseline.high / model.low)
    return Spread(model.median / baseline.median, model.low / baseline.high, model.high / baseline.low)


def unreliable_reason(model: Spread, baseline: Spread | None, speedup: Spread | None, ideal: float | None) -> str | None:
    """Why a row's figures cannot be taken as a result, or None: the repeats of either model spread
    wider than WIDE_SPREAD of their median, or the speedup exceeds the ideal by more than its own
    range (and more than IDEAL_TOLERANCE), which only a machine whose load changed between the models'
    turns produces."""
    for name, spread in (("pruned", model), ("dense", baseline)):
        if spread is not None and relative_spread(spread) > WIDE_SPREAD:
            who = f"the {name} model's" if baseline is not None else "its"
            return (f"{who} repeats spread {relative_spread(spread):.0%} of their median (over {WIDE_SPREAD:.0%}): "
                    "the machine was busy while it was timed")
    if speedup is not None and ideal is not None:
        excess = speedup.median - ideal
        if excess > max(speedup.high - speedup.low, IDEAL_TOLERANCE * ideal):
            return (f"{speedup.median:.2f}x exceeds the ideal {ideal:.2f}x by more than its range "
                    f"({speedup.low:.2f}-{speedup.high:.2f}): the machine's load changed between the two models' turns")
    return None


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(model: nn.Module, context: float) -> float:
    """Forward FLOPs for one token that attends to `context` tokens, by prunekit's one cost model
    (`ModelStructure.layer_flops`): read from the modules, so pruned heads and widths count as they are."""
    from prunekit.models.structure import model_structure

    return model_structure(model).flops_at_context(context)


# ----------------------------------------------------------------------------- metrics


def metric_names(settings: SpeedSettings) -> list[str]:
    names = ["prefill_tokens_per_s"]
    for batch in settings.decode_batches:
        names += [f"decode_tokens_per_s_batch{batch}", f"time_to_first_token_ms_batch{batch}"]
    return names


def _is_time(metric: str) -> bool:
    return metric.startswith("time_")


def metric_label(metric: str, settings: SpeedSettings) -> str:
    if metric == "prefill_tokens_per_s":
        return f"prefill tokens/s ({settings.prefill_batch} x {settings.prefill_len})"
    kind, batch = re.fullmatch(r"(\w+)_batch(\d+)", metric).groups()
    if kind == "decode_tokens_per_s":
        return f"decode tokens/s (batch {batch}, {settings.decode})"
    return f"first token ms (batch {batch}, {settings.decode_context}-token prompt)"


# ----------------------------------------------------------------------------- measuring


def random_token_ids(batch: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Token ids drawn uniformly; speed does not depend on their values, only their number."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", _PROC_STATUS.read_text())[1])


def _cpu_peak_tracking_works() -> bool:
    """Whether this process can reset its RSS high-water mark (Linux >= 4.0; not macOS, not some sandboxes)."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
        return "VmHWM:" in _PROC_STATUS.read_text()
    except OSError:
        return False


def _call_with_peak_memory(call: Callable[[], Measured], device: torch.device) -> tuple[Measured, float]:
    """`call`'s result and the peak bytes it allocated above the level before it."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        measured = call()
        _synchronize(device)
        return measured, torch.cuda.max_memory_allocated(device) - start
    # Writing 5 to clear_refs resets the RSS high-water mark (Linux >= 4.0).
    _PROC_CLEAR_REFS.write_text("5")
    start = _rss_kib("VmRSS")
    measured = call()
    return measured, (_rss_kib("VmHWM") - start) * 1024.0


def _time_prefill(forward: Callable[..., Any], input_ids: torch.Tensor) -> Measured:
    device = input_ids.device
    _synchronize(device)
    start = time.perf_counter()
    # Full logits for every position: the workload of scoring (perplexity, lm-eval), and the one
    # the FLOPs count, which includes the LM head for every token, describes.
    forward(input_ids=input_ids, use_cache=False)
    _synchronize(device)
    return {"prefill_tokens_per_s": input_ids.numel() / (time.perf_counter() - start)}


class _StepClock:
    """A logits processor that notes when each new token's logits are ready."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _time_decode(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, use_compile: bool) -> Measured:
    from transformers import GenerationConfig, LogitsProcessorList

    batch = prompt_ids.shape[0]
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    pad = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(
        # min_new_tokens masks end-of-sequence, so every repeat decodes exactly `new_tokens` tokens.
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=pad if pad is not None else 0,
    )
    if use_compile and prompt_ids.device.type == "cuda":
        # transformers compiles the decode step itself when the KV cache is static.
        config.cache_implementation = "static"
    clock = _StepClock(prompt_ids.device)
    _synchronize(prompt_ids.device)
    start = time.perf_counter()
    model.generate(
        input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=config,
        logits_processor=LogitsProcessorList([clock]),
    )
    first_token, last_token = clock.times[0], clock.times[-1]
    return {
        f"decode_tokens_per_s_batch{batch}": batch * (new_tokens - 1) / (last_token - first_token),
        f"time_to_first_token_ms_batch{batch}": (first_token - start) * 1000.0,
    }


class _StaticCacheDecode:
    """Greedy decoding with a static KV cache, one step at a time, each step fed the last step's
    token. With `use_graph` (CUDA), the step (forward, argmax, advancing the position) is captured
    once as a CUDA graph and replayed, so a step costs one launch: the way GPU_BENCHMARKS.md times
    decode. Without it, the same step runs eagerly (how the CPU tests check the tokens)."""

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, use_graph: bool) -> None:
        from transformers import StaticCache

        self.model, self.device = model, prompt_ids.device
        batch, self.context = prompt_ids.shape
        # room for the steps and for the warm-up steps before a capture, which are rewound
        self.cache = StaticCache(config=model.config, max_cache_len=self.context + new_tokens + 4)
        self.position = torch.tensor([self.context], device=self.device)
        self.position_ids = self.position.expand(batch, 1).clone()
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.graph = None
        self.use_graph = use_graph

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The prompt into the cache; the first new token (its logits are the time to first token)."""
        logits = self.model(input_ids=prompt_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                            cache_position=torch.arange(self.context, device=self.device)).logits
        first = logits[:, -1:].argmax(-1)
        self.ids.copy_(first)
        return first

    def _step(self) -> None:
        logits = self.model(input_ids=self.ids, past_key_values=self.cache, cache_position=self.position,
                            position_ids=self.position_ids, use_cache=True, logits_to_keep=1).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)
        self.position_ids.add_(1)

    def _rewind(self, first: torch.Tensor) -> None:
        """Back to the prompt alone in the cache and `first` as the next input: the warm-up steps a
        capture needs advanced both. Recent transformers keep a write counter per cache layer (a
        device tensor); older ones write where `cache_position` says."""
        for layer in getattr(self.cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(self.context)
            if isinstance(getattr(layer, "cumulative_length_int", None), int):  # sliding-window layers
                layer.cumulative_length_int = self.context
        self.position.fill_(self.context)
        self.position_ids.fill_(self.context)
        self.ids.copy_(first)

    def capture(self, first: torch.Tensor) -> None:
        """Record the step as a CUDA graph (after the eager warm-up steps CUDA graphs require)."""
        if not self.use_graph:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._rewind(first)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self._rewind(first)

    def step(self) -> torch.Tensor:
        """One token more for every row; returns the tokens (a buffer the next step overwrites)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.ids


def _time_graph_decode(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, use_graph: bool) -> Measured:
    """Time to first token (the prompt through the static cache, eagerly) and the throughput of
    the `new_tokens - 1` steps after it, each replayed from the captured graph; the capture is untimed."""
    batch, device = prompt_ids.shape[0], prompt_ids.device
    decoder = _StaticCacheDecode(model, prompt_ids, new_tokens, use_graph)
    _synchronize(device)
    start = time.perf_counter()
    first = decoder.prefill(prompt_ids)
    _synchronize(device)
    first_token = time.perf_counter()
    decoder.capture(first)
    _synchronize(device)
    steps_start = time.perf_counter()
    for _ in range(new_tokens - 1):
        decoder.step()
    _synchronize(device)
    return {
        f"decode_tokens_per_s_batch{batch}": batch * (new_tokens - 1) / (time.perf_counter() - steps_start),
        f"time_to_first_token_ms_batch{batch}": (first_token - start) * 1000.0,
    }


def static_cache_greedy_tokens(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int,
                               use_graph: bool = False) -> torch.Tensor:
    """The `new_tokens` greedy tokens that graph decoding produces (eagerly unless `use_graph`),
    to check them against `generate`."""
    decoder = _StaticCacheDecode(model, prompt_ids, new_tokens, use_graph)
    with torch.inference_mode():
        first = decoder.prefill(prompt_ids)
        decoder.capture(first)
        tokens = [first] + [decoder.step().clone() for _ in range(new_tokens - 1)]
    return torch.cat(tokens, dim=1)


# ----------------------------------------------------------------------------- checks


def decode_mode(decode: str | None, device: str) -> str:
    """The decode timing for `device`: `decode` when given, else graph on a GPU and eager on the CPU."""
    if decode is None:
        return "graph" if device == "cuda" else "eager"
    if decode not in DECODE_MODES:
        raise EvalError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}.")
    if decode == "graph" and device != "cuda":
        raise EvalError("decode 'graph' replays CUDA graphs, which need the cuda device; on the CPU time decode "
                        "eagerly (--decode eager), or add --device cuda on a GPU machine.")
    return decode


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _resolve_dtype(dtype: torch.dtype | str | None, model: nn.Module) -> torch.dtype:
    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EvalError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise EvalError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device 'cuda' was asked for, but torch finds no CUDA GPU here; use --device cpu.")
    return torch.device(device)


def _check_fits(name: str, model: nn.Module, tokens: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise EvalError(f"{what} needs {tokens} positions but the {name} has {limit}; shorten it.")


# ----------------------------------------------------------------------------- benchmark


def benchmark_speed(
    model: nn.Module,
    *,
    baseline: nn.Module | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    prefill_batch: int = 8,
    prefill_len: int = 512,
    decode_batches: tuple[int, ...] = (1, 16),
    decode_context: int = 128,
    decode_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 5,
    use_compile: bool = False,
    ideal_speedup: float | None = None,
    seed: int = 0,
    decode: str | None = None,
) -> SpeedResult:
    """Measure `model`, and `baseline` interleaved with it when given.

    Prefill runs a full forward on `prefill_batch` x `prefill_len` random tokens. Decode generates
    `decode_tokens` greedy tokens after a `decode_context`-token prompt at each of `decode_batches`;
    its throughput counts the tokens after the first, and the time to the first is reported apart.
    `decode` (DECODE_MODES; default graph on CUDA, eager on the CPU) says how decode runs: graph
    replays each step from a CUDA graph over a static KV cache, its time to first token is the
    prompt's pass through that cache; eager calls `generate`. With `use_compile`, prefill runs through
    torch.compile, and eager decode on CUDA uses a static KV cache that transformers compiles.

    The ideal speedup is `ideal_speedup` when given, else the ratio of `flops_per_token` of the two
    models at the mean context of a causal prefill, (prefill_len + 1) / 2.

    The models are moved to `device` and cast to `dtype` (default: the model's dtype, which the
    baseline is cast to as well) in place, as `Module.to` does; pass copies to keep the originals.
    """
    decode = decode_mode(decode, device)
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, model)
    for name, value, minimum in [("prefill_batch", prefill_batch, 1), ("prefill_len", prefill_len, 1),
                                 ("decode_context", decode_context, 1), ("warmup", warmup, 0),
                                 ("repeats", repeats, 1), ("seed", seed, 0),
                                 # Decode throughput is timed between the first and last token.
                                 ("decode_tokens", decode_tokens, 2)]:
        _check_int(name, value, minimum)
    decode_batches = tuple(decode_batches)
    if not decode_batches or len(set(decode_batches)) != len(decode_batches):
        raise EvalError(f"decode_batches must list distinct batch sizes, got {decode_batches!r}; e.g. (1, 16).")
    for batch in decode_batches:
        _check_int("each decode batch", batch, 1)
    if use_compile and warmup < 2:
        # torch.compile compiles in the first call and still runs slow in the second.
        raise EvalError("use_compile needs two untimed calls to compile and settle; set warmup >= 2.")
    if ideal_speedup is not None and (baseline is None or not ideal_speedup > 0):
        raise EvalError("ideal_speedup needs a baseline and a value > 0; pass baseline= or drop ideal_speedup.")
    # before any model work, so the figure is the machine's and not ours
    load_average = _load_average()
    track_memory = torch_device.type == "cuda" or _cpu_peak_tracking_works()
    memory_method = MEMORY_METHODS[torch_device.type] if track_memory else "not measured (no /proc/self/clear_refs)"

    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    for name, candidate in models.items():
        _check_fits(name, candidate, prefill_len, "prefill_len")
        _check_fits(name, candidate, decode_context + decode_tokens, "decode_context + decode_tokens")
    if baseline is not None and ideal_speedup is None:
        context = (prefill_len + 1) / 2
        flops = {name: flops_per_token(candidate, context) for name, candidate in models.items()}
        ideal_speedup = flops["baseline"] / flops["model"]
        ideal_basis = f"FLOPs per token at context {context:g} (mean of a {prefill_len}-token causal prefill)"
    else:
        flops = {}
        ideal_basis = None if baseline is None else "given"

    settings = SpeedSettings(
        device=device, dtype=str(torch_dtype).removeprefix("torch."), prefill_batch=prefill_batch,
        prefill_len=prefill_len, decode_batches=decode_batches, decode_context=decode_context,
        decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, use_compile=use_compile, seed=seed,
        memory_method=memory_method, load_average=load_average, cpu_count=os.cpu_count(), decode=decode,
    )
    for candidate in models.values():
        candidate.to(device=torch_device, dtype=torch_dtype).eval()

    # Both models see the same tokens, so ids must be valid for the smaller vocabulary.
    vocab_size = min(candidate.config.vocab_size for candidate in models.values())
    prefill_ids = random_token_ids(prefill_batch, prefill_len, vocab_size, seed).to(torch_device)
    prompts = {
        batch: random_token_ids(batch, decode_context, vocab_size, seed + batch).to(torch_device)
        for batch in decode_batches
    }
    forwards = {name: torch.compile(candidate) if use_compile else candidate for name, candidate in models.items()}
    phases: list[Callable[[str], Measured]] = [lambda name: _time_prefill(forwards[name], prefill_ids)]
    if decode == "graph":
        phases += [lambda name, prompt=prompt: _time_graph_decode(models[name], prompt, decode_tokens, use_graph=True)
                   for prompt in prompts.values()]
    else:
        phases += [lambda name, prompt=prompt: _time_decode(models[name], prompt, decode_tokens, use_compile)
                   for prompt in prompts.values()]

    samples, peak_bytes = _measure_interleaved(phases, list(models), warmup, repeats,
                                               torch_device if track_memory else None)

    speeds = {
        name: ModelSpeed(
            timings={metric: Spread.of(values) for metric, values in samples[name].items()},
            peak_memory_mib=(_weight_bytes(candidate) + peak_bytes[name]) / 2**20 if track_memory else None,
            parameters=sum(p.numel() for p in candidate.parameters()),
            flops_per_token=flops.get(name),
        )
        for name, candidate in models.items()
    }
    speedup = None
    if baseline is not None:
        speedup = {metric: speedup_of(metric, speeds["model"].timings[metric], speeds["baseline"].timings[metric])
                   for metric in speeds["model"].timings}
    return SpeedResult(
        settings=settings, model=speeds["model"], baseline=speeds.get("baseline"), speedup=speedup,
        ideal_speedup=ideal_speedup, ideal_basis=ideal_basis,
    )


def _measure_interleaved(
    phases: list[Callable[[str], Measured]], names: list[str], warmup: int, repeats: int,
    memory_device: torch.device | None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Per model name, each metric's values over the repeats and the peak bytes above start.

    Each phase runs for every model in turn before the next phase starts, repeat after repeat.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    peak_bytes = {name: 0.0 for name in names}
    with torch.inference_mode(), tqdm(total=(warmup + repeats) * len(phases) * len(names), desc="speed") as bar:
        for repeat in range(warmup + repeats):
            for phase in phases:
                for name in names:
                    call = functools.partial(phase, name)
                    measured, peak = _call_with_peak_memory(call, memory_device) if memory_device else (call(), 0.0)
                    if repeat >= warmup:
                        for metric, value in measured.items():
                            samples[name].setdefault(metric, []).append(value)
                        peak_bytes[name] = max(peak_bytes[name], peak)
                    bar.update()
    return samples, peak_bytes


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(value, 2) for value in os.getloadavg())
    except OSError:  # not on every platform
        return None


def _weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- tables


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def _spread(spread: Spread, dash: str = "-") -> str:
    return f"{_number(spread.median)} ({_number(spread.low)}{dash}{_number(spread.high)})"


def _ratio(spread: Spread, dash: str = "-", times: str = "x") -> str:
    return f"{spread.median:.2f}{times} ({spread.low:.2f}{dash}{spread.high:.2f})"


UNRELIABLE = "unreliable"


def _rows(result: SpeedResult, dash: str, times: str, labels: dict[str, str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and notes of a speed table, shared by the plain-text and the Markdown form."""
    settings = result.settings
    compared = result.baseline is not None
    unreliable = result.unreliable()
    header = ["metric", labels["model"]] + ([labels["baseline"], "speedup", "ideal"] if compared else [])
    ideal = f"{result.ideal_speedup:.2f}{times}" if result.ideal_speedup is not None else "-"
    rows, flagged = [], []
    for metric in metric_names(settings):
        label = metric_label(metric, settings)
        model = result.model.timings[metric]
        row = [label, _spread(model, dash)]
        if compared:
            speedup = speedup_of(metric, model, result.baseline.timings[metric])
            row += [_spread(result.baseline.timings[metric], dash),
                    UNRELIABLE if metric in unreliable else _ratio(speedup, dash, times), ideal]
        elif metric in unreliable:
            row[1] += f" {UNRELIABLE}"
        if metric in unreliable:
            flagged.append(f"{label}: {UNRELIABLE}, not a result: {unreliable[metric]}")
        rows.append(row)

    def size_row(label: str, model_value: float | None, baseline_value: float | None) -> list[str]:
        row = [label, "n/a" if model_value is None else _number(model_value)]
        if compared:
            both = model_value is not None and baseline_value is not None
            row += ["n/a" if baseline_value is None else _number(baseline_value),
                    f"{baseline_value / model_value:.2f}{times}" if both else "-", "-"]
        return row

    baseline = result.baseline
    rows.append(size_row("peak memory MiB", result.model.peak_memory_mib,
                         None if baseline is None else baseline.peak_memory_mib))
    rows.append(size_row("parameters (M)", result.model.parameters / 1e6,
                         None if baseline is None else baseline.parameters / 1e6))
    notes = [f"{settings.device}, {settings.dtype}, median ({'min' + dash + 'max'}) of {settings.repeats} repeats after "
             f"{settings.warmup} warm-up" + (", compiled" if settings.use_compile else "")
             + (", the two models interleaved" if compared else "") + f"; memory: {settings.memory_method}",
             f"decode: {settings.decode} ({DECODE_MODES.get(settings.decode, 'as recorded')})"]
    if compared:
        notes.append(f"speedup: the ratio of the two medians shown, > 1 when the {labels['model']} column is faster (or, "
                     f"for memory and parameters, smaller); its range: the slowest repeat of one against the fastest "
                     f"of the other; ideal: {result.ideal_basis or 'not recorded'}")
    if settings.load_note():
        notes.append(settings.load_note())
    return header, rows, notes + flagged


def format_speed_table(result: SpeedResult) -> str:
    """A plain-text table: metric, model, and with a baseline: baseline, speedup, ideal.

    Cells read "median (min-max)" over the repeats; a speedup is the ratio of the medians shown
    (> 1: the model is faster, or for memory and parameters smaller). Rows that `unreliable_reason`
    flags show "unreliable" and the reason below the table instead of a speedup.
    """
    header, rows, notes = _rows(result, "-", "x", {"model": "model", "baseline": "baseline"})
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + notes)


def format_speed_markdown(speed: SpeedResult | dict[str, Any]) -> str:
    """The same table as `format_speed_table` in Markdown, from a SpeedResult or its `to_dict()`
    record (the run report and the model card print this one)."""
    result = speed if isinstance(speed, SpeedResult) else SpeedResult.from_dict(speed)
    header, rows, notes = _rows(result, "–", "×", {"model": "pruned", "baseline": "dense"})
    align = ["---"] * len(header)
    align[0] = ":---"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}." for note in notes)
