"""Speed benchmark: fields, interleaving, FLOPs count, table and errors, on tiny models."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import tiny_model
from prunekit.evaluate.speed import (
    EvalError,
    SpeedResult,
    benchmark_speed,
    flops_per_token,
    format_speed_table,
    metric_label,
    metric_names,
    random_token_ids,
)

QUICK = dict(prefill_batch=2, prefill_len=32, decode_batches=(1, 3), decode_context=16, decode_tokens=6,
             warmup=1, repeats=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A small model and a wider baseline of the same family, as after pruning FFN and heads."""
    small = tiny_model("llama")
    wide = tiny_model("llama", seed=1, hidden_size=96, intermediate_size=256)
    return small, wide


@pytest.fixture(scope="module")
def comparison(models) -> SpeedResult:
    small, wide = models
    return benchmark_speed(small, baseline=wide, **QUICK)


def _matmul_flops(model: torch.nn.Module, context: float) -> tuple[float, float]:
    """A multiply-add for every Linear weight, and the attention scores and values at `context`."""
    config = model.config
    linear = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, 4 * config.num_hidden_layers * context * config.num_attention_heads * config.head_dim


def test_comparison_returns_every_metric_for_both_models(models, comparison: SpeedResult) -> None:
    names = metric_names(comparison.settings)
    assert len(names) == 1 + 2 * len(QUICK["decode_batches"])
    for speed, model in zip((comparison.model, comparison.baseline), models):
        assert set(speed.timings) == set(names)
        for spread in speed.timings.values():
            assert 0 < spread.low <= spread.median <= spread.high
        weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        # the peak is the weights plus what the calls allocated above them
        assert speed.peak_memory_mib is None or speed.peak_memory_mib >= weights_mib
        linear, attention = _matmul_flops(model, (QUICK["prefill_len"] + 1) / 2)
        # the cost model counts the products, plus a little for norms, rotary and softmax
        assert linear + attention <= speed.flops_per_token <= 1.01 * (linear + attention)
    assert comparison.model.parameters < comparison.baseline.parameters
    assert set(comparison.speedup) == set(names)
    for metric, ratio in comparison.speedup.items():
        model, baseline = comparison.model.timings[metric], comparison.baseline.timings[metric]
        faster = baseline.median / model.median if metric.startswith("time_") else model.median / baseline.median
        assert ratio.median == pytest.approx(faster) and ratio.low <= ratio.median <= ratio.high
    assert comparison.ideal_speedup == pytest.approx(
        comparison.baseline.flops_per_token / comparison.model.flops_per_token)
    assert comparison.ideal_speedup > 1
    json.dumps(comparison.to_dict())


def test_models_are_measured_interleaved(models) -> None:
    small, wide = models
    calls: list[str] = []
    hooks = [model.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
             for name, model in (("model", small), ("baseline", wide))]
    try:
        benchmark_speed(small, baseline=wide, **(QUICK | dict(repeats=2, warmup=0)))
    finally:
        for hook in hooks:
            hook.remove()
    # Prefill is one forward and decode one per token; collapse each run of calls into one.
    turns = [name for name, _ in itertools.groupby(calls)]
    phases_per_repeat = 1 + len(QUICK["decode_batches"])
    assert turns == ["model", "baseline"] * (2 * phases_per_repeat)


def test_table_shows_models_side_by_side(comparison: SpeedResult) -> None:
    table = format_speed_table(comparison)
    header = table.splitlines()[0].split()
    assert header == ["metric", "model", "baseline", "speedup", "ideal"]
    for metric in metric_names(comparison.settings):
        assert metric_label(metric, comparison.settings) in table
    assert f"{comparison.ideal_speedup:.2f}x" in table
    assert "peak memory MiB" in table and "ideal: FLOPs per token" in table


def test_single_model_has_no_comparison(models) -> None:
    result = benchmark_speed(models[0], **(QUICK | dict(decode_batches=(1,), repeats=1)))
    assert result.baseline is None and result.speedup is None and result.ideal_speedup is None
    assert format_speed_table(result).splitlines()[0].split() == ["metric", "model"]


def test_given_ideal_speedup_wins_over_flops(models) -> None:
    small, wide = models
    result = benchmark_speed(small, baseline=wide, ideal_speedup=1.5, **(QUICK | dict(decode_batches=(1,), repeats=1)))
    assert result.ideal_speedup == 1.5 and result.ideal_basis == "given"


def test_flops_per_token_counts_linear_weights_and_attention() -> None:
    model = tiny_model("llama")
    config = model.config
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * ffn + 2 * hidden  # + its two norms
    lm_head = config.vocab_size * hidden
    context = 20
    expected = 2 * (layers * per_layer + lm_head) + layers * 4 * q_width * context
    assert flops_per_token(model, context) == expected


def test_flops_per_token_caps_sliding_window_layers() -> None:
    model = tiny_model("gemma2")  # layers alternate a 6-token window and full attention
    q_width = model.config.num_attention_heads * model.config.head_dim
    full_layers = model.config.num_hidden_layers // 2
    # Beyond the window only the full-attention layers grow with context.
    assert flops_per_token(model, 101) - flops_per_token(model, 100) == 4 * q_width * full_layers


def test_random_inputs_are_deterministic_for_a_seed() -> None:
    assert torch.equal(random_token_ids(2, 8, 300, seed=3), random_token_ids(2, 8, 300, seed=3))
    assert not torch.equal(random_token_ids(2, 8, 300, seed=3), random_token_ids(2, 8, 300, seed=4))


def test_cuda_without_gpu_is_a_clear_error(models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalError, match="no CUDA GPU.*--device cpu"):
        benchmark_speed(models[0], device="cuda", **QUICK)


@pytest.mark.parametrize("setting, problem", [
    (dict(device="tpu"), "unknown device 'tpu'; choose one of cpu, cuda"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(decode_tokens=1), "decode_tokens must be an integer >= 2"),
    (dict(repeats=0), "repeats must be"),
    (dict(decode_batches=(1, 1)), "distinct batch sizes"),
    (dict(ideal_speedup=2.0), "ideal_speedup needs a baseline"),
    (dict(use_compile=True, warmup=1), "warmup >= 2"),
    (dict(prefill_len=4096), "prefill_len needs 4096 positions but the model has 128"),
])
def test_bad_settings_are_rejected_before_measuring(models, setting: dict, problem: str) -> None:
    with pytest.raises(EvalError, match=problem):
        benchmark_speed(models[0], **(QUICK | setting))


# ----------------------------------------------------------------------------- trust on a shared machine


def test_the_speedup_is_the_ratio_of_the_medians_shown(comparison: SpeedResult) -> None:
    from prunekit.evaluate.speed import speedup_of

    for metric, ratio in comparison.speedup.items():
        model, baseline = comparison.model.timings[metric], comparison.baseline.timings[metric]
        if metric.startswith("time_"):
            assert ratio.median == pytest.approx(baseline.median / model.median)
            assert (ratio.low, ratio.high) == pytest.approx((baseline.low / model.high, baseline.high / model.low))
        else:
            assert ratio.median == pytest.approx(model.median / baseline.median)
        assert ratio == speedup_of(metric, model, baseline)
    assert "the ratio of the two medians shown" in format_speed_table(comparison)
    load = comparison.settings.load_average
    assert load is None or (len(load) == 3 and "load average at the start" in format_speed_table(comparison))
    # a record read back forms the same ratios, and older records with other speedups are formed again
    record = comparison.to_dict()
    record["speedup"] = {metric: {"median": 9.0, "low": 9.0, "high": 9.0} for metric in record["speedup"]}
    assert SpeedResult.from_dict(json.loads(json.dumps(record))).speedup == comparison.speedup


@pytest.mark.parametrize("model, baseline, ratio, ideal, reason", [
    ((10, 9.9, 10.1), (8, 7.9, 8.1), None, 1.3, None),
    ((10, 6, 12), (8, 7.9, 8.1), None, 1.3, "the pruned model's repeats spread 60% of their median"),
    ((10, 9.9, 10.1), (8, 4, 8.1), None, 1.3, "the dense model's repeats spread 51% of their median"),
    ((10, 9.9, 10.1), (5, 4.9, 5.1), None, 1.3, "2.00x exceeds the ideal 1.30x by more than its range"),
    ((10, 9.9, 10.1), (7.5, 7.4, 7.6), None, 1.3, None),  # 1.33x: within 5% of the ideal
])
def test_wide_spreads_and_speedups_beyond_the_ideal_are_flagged(model, baseline, ratio, ideal, reason) -> None:
    from prunekit.evaluate.speed import Spread, speedup_of, unreliable_reason

    model, baseline = Spread(*model), Spread(*baseline)
    found = unreliable_reason(model, baseline, speedup_of("decode_tokens_per_s_batch1", model, baseline), ideal)
    assert found == reason if reason is None else found.startswith(reason)


def _burn(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_busy_machine_marks_the_rows_unreliable_instead_of_printing_ratios(models) -> None:
    """The CPU is loaded on purpose halfway through: busy processes start in the second timed repeat."""
    import multiprocessing
    import os

    small, wide = models
    context = multiprocessing.get_context("spawn")
    burners: list = []
    calls = {"n": 0}

    def start_load_in_the_second_repeat(*_):
        calls["n"] += 1
        # one warm-up and one repeat of prefill + one decode (1 + 6 steps): 2 x 8 calls of the model before
        if calls["n"] == 2 * 8 + 1 and not burners:
            burners.extend(context.Process(target=_burn, args=(20.0,), daemon=True) for _ in range(3 * (os.cpu_count() or 2)))
            for burner in burners:
                burner.start()

    hook = small.register_forward_pre_hook(start_load_in_the_second_repeat)
    try:
        result = benchmark_speed(small, baseline=wide, prefill_batch=2, prefill_len=64, decode_batches=(1,),
                                 decode_context=16, decode_tokens=6, warmup=1, repeats=3)
    finally:
        hook.remove()
        for burner in burners:
            burner.terminate()
    assert burners, "the load never started"
    unreliable = result.unreliable()
    assert unreliable, format_speed_table(result)
    table = format_speed_table(result)
    for metric, reason in unreliable.items():
        label = metric_label(metric, result.settings)
        row = next(line for line in table.splitlines() if line.startswith(label))
        assert "unreliable" in row and "x (" not in row  # no ratio printed as a result
        assert f"{label}: unreliable, not a result: {reason}" in table
        assert "machine" in reason
    assert result.to_dict()["unreliable"] == unreliable


# ----------------------------------------------------------------------------- decode modes


def test_decode_is_graph_on_a_gpu_and_eager_on_the_cpu_unless_asked():
    from prunekit.evaluate.speed import DECODE_MODES, decode_mode

    assert decode_mode(None, "cuda") == "graph" and decode_mode(None, "cpu") == "eager"
    assert decode_mode("eager", "cuda") == "eager" and decode_mode("graph", "cuda") == "graph"
    with pytest.raises(EvalError, match=r"decode 'graph' replays CUDA graphs, which need the cuda device"):
        decode_mode("graph", "cpu")
    with pytest.raises(EvalError, match=r"unknown decode mode 'static'; choose one of graph, eager"):
        decode_mode("static", "cuda")
    assert set(DECODE_MODES) == {"graph", "eager"}


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3"])
def test_static_cache_decoding_gives_the_tokens_of_generate(family):
    """What graph decode replays, run eagerly: prompt into a static cache, then one step per token
    fed the last token, on an unevenly pruned model with a dropped layer (and sliding windows for
    gemma2, shorter than the prompt), gives generate's greedy tokens."""
    from transformers import GenerationConfig

    from prunekit import apply_plan
    from prunekit.evaluate.speed import static_cache_greedy_tokens
    from prunekit.plan.plan import LayerPlan, Plan

    model = tiny_model(family)
    apply_plan(model, Plan(layers={0: LayerPlan(keep_kv_groups=(1,)),
                                   1: LayerPlan(keep_query_heads=(0, 2, 4, 6), keep_channels=tuple(range(0, 80, 3)))},
                           drop_layers=(2,)))
    prompt = random_token_ids(3, 9, 300, seed=1)
    config = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  generation_config=config)[:, prompt.shape[1]:]
    assert torch.equal(static_cache_greedy_tokens(model, prompt, 5), expected)


def test_the_decode_mode_reaches_the_timer_and_the_table(models, monkeypatch):
    """`benchmark_speed(decode=...)` picks the timer, records the mode and names it in the table;
    graph mode's timer runs here without the capture (the CPU has no CUDA graphs)."""
    from prunekit.evaluate import speed as speed_module

    small, _ = models
    used = []
    original = speed_module._time_graph_decode
    monkeypatch.setattr(speed_module, "_resolve_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(speed_module, "_time_graph_decode", lambda model, prompt, tokens, use_graph: used.append(
        use_graph) or original(model, prompt, tokens, use_graph=False))
    quick = {**QUICK, "repeats": 1, "decode_batches": (2,)}
    result = benchmark_speed(small, device="cuda", decode=None, **quick)  # cuda as far as the mode goes
    assert result.settings.decode == "graph" and used == [True, True]
    assert set(result.model.timings) == set(metric_names(result.settings))
    table = format_speed_table(result)
    assert "decode tokens/s (batch 2, graph)" in table and "decode: graph (static KV cache" in table
    eager = benchmark_speed(small, device="cpu", **quick)
    assert eager.settings.decode == "eager" and "decode tokens/s (batch 2, eager)" in format_speed_table(eager)
    # a record made before the choice existed reads as eager
    record = eager.to_dict()
    del record["settings"]["decode"]
    assert SpeedResult.from_dict(record).settings.decode == "eager"
