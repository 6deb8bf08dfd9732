"""Layer-by-layer mode: one decoder layer at a time over cached calibration states gives the
same statistics, scores and pruned model as the whole model run at once; criteria that need the
whole model are refused; the device needs far less memory than the model. And non-finite
weights or scores are refused before any work that would use them."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from prunekit.models.layerwise import embed_calibration
from prunekit.models.loading import DeviceError, NonFiniteWeightsError, check_device
from prunekit.models.memory import InsufficientMemoryError, layer_by_layer_estimate, pruning_estimate
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.models.structure import model_structure
from prunekit.pipeline import CalibrationSettings, PruneSettings, check_memory, prune_loaded
from prunekit.score import CriterionError, ScoreError, Scores, collect_layer_stats, score_model
from prunekit.score import statistics

IDS = torch.randint(3, 259, (10, 20), generator=torch.Generator().manual_seed(1))


def _close(a, b):
    # Gram products are float32 on a CPU (summed in float64): batches of other sizes round differently.
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_statistics_layer_by_layer_equal_the_whole_model_pass(family, one_thread):
    model = tiny_model(family)
    whole = collect_layer_stats(model, IDS, batch_size=4, with_gram=True, progress=False)
    layered = collect_layer_stats(model, IDS, batch_size=3, with_gram=True, progress=False, layer_by_layer=True,
                                  device="cpu")
    assert len(whole) == len(layered) == model.config.num_hidden_layers
    for a, b in zip(whole, layered):
        assert a.tokens == b.tokens == IDS.numel()
        for fa, fb in ((a.attention_input, b.attention_input), (a.mlp_input, b.mlp_input)):
            assert fa.tokens == fb.tokens
            for name in ("sum", "sum_sq", "gram"):
                _close(getattr(fa, name), getattr(fb, name))
        for name in ("cos_sum", "angle_sum", "contribution_norm_sum"):
            assert getattr(a, name).keys() == getattr(b, name).keys()
            for kind in getattr(a, name):
                _close(getattr(a, name)[kind], getattr(b, name)[kind])
    # the layers' own forwards are back
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model, {"layers": "model.layers"}))


@pytest.mark.parametrize("criterion", ["activation", "fluctuation", "block_influence"])
def test_scores_layer_by_layer_equal_the_whole_model_ones(criterion, one_thread):
    model = tiny_model("qwen3")
    whole = score_model(model, criterion, IDS, batch_size=4, progress=False)
    layered = score_model(model, criterion, IDS, batch_size=4, progress=False, layer_by_layer=True, device="cpu")
    for kind, per_layer in whole.values.items():
        for a, b in zip(per_layer, layered.values[kind]):
            _close(a, b)


def test_float64_moments_are_the_same_in_chunks(monkeypatch):
    x = torch.randn(3, 7, 5)
    whole = statistics.FeatureStats.empty(5, True)
    whole.add(x)
    monkeypatch.setattr(statistics, "_CHUNK_ELEMENTS", 10)  # two tokens per chunk
    chunked = statistics.FeatureStats.empty(5, True)
    chunked.add(x)
    flat = x.reshape(-1, 5).double()
    _close(chunked.gram, flat.T @ flat)
    for name in ("sum", "sum_sq", "gram"):
        _close(getattr(whole, name), getattr(chunked, name))


def test_embedding_capture_runs_no_layer_and_gives_the_first_layer_input(one_thread):
    model = tiny_model("gemma3_text")  # per-layer-type masks and rotary embeddings
    layers = decoder_layers(model, {"layers": "model.layers"})
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model.model(IDS[:4])
    handle.remove()
    states, kwargs_of = embed_calibration(model, layers, IDS, batch_size=3, device="cpu")
    torch.testing.assert_close(states[:4], seen["x"])
    assert states.shape == (len(IDS), IDS.shape[1], model.config.hidden_size)
    assert len(kwargs_of) == len(layers) and all("position_embeddings" in kw for kw in kwargs_of)


@pytest.mark.parametrize("compensation", ["sequential", "one-shot"])
def test_pruned_model_layer_by_layer_equals_the_whole_model_one(compensation, tokenizer, one_thread):
    settings = PruneSettings(target=0.3, criterion="activation", compensation=compensation, batch_size=4, ffn_multiple=16,
                             calibration=CalibrationSettings(n_samples=len(IDS), seq_len=IDS.shape[1]))
    model = tiny_model("llama")
    whole, layered = copy.deepcopy(model), copy.deepcopy(model)
    calibration = (IDS, None)
    record_whole = prune_loaded(whole, tokenizer, settings, progress=False, calibration=calibration)
    record_layered = prune_loaded(layered, tokenizer, PruneSettings(**{**settings.__dict__, "layer_by_layer": True,
                                                                       "device": "cpu"}),
                                  progress=False, calibration=calibration)
    assert record_whole["steps"][0]["plan"] == record_layered["steps"][0]["plan"]
    assert record_whole["params"]["after"] < record_whole["params"]["before"]
    a, b = whole.state_dict(), layered.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_criteria_that_need_the_whole_model_are_refused_layer_by_layer():
    for criterion in ("taylor", "sensitivity"):
        settings = PruneSettings(criterion=criterion, prune=("head",), layer_by_layer=True)
        with pytest.raises(CriterionError, match="cannot run layer by layer; use one of activation, block_influence, "
                                                 "fluctuation, magnitude, random"):
            settings.validate()
    PruneSettings(criterion="activation", layer_by_layer=True, device="cpu").validate()


def test_devices_are_checked_before_any_work():
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        PruneSettings(criterion="activation", device="gpu").validate()
    check_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            check_device("cuda:0")


def _llama3_8b_structure():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("meta"):
        return model_structure(LlamaForCausalLM(config))


def test_layer_by_layer_needs_a_fraction_of_the_whole_models_memory():
    structure = _llama3_8b_structure()
    weights = structure.total_params * 2
    whole = pruning_estimate(structure, "bfloat16", gradients=False, batch_size=8, seq_len=2048)
    for compensation in ("none", "one-shot", "sequential"):
        layered = layer_by_layer_estimate(structure, "bfloat16", n_samples=128, seq_len=2048, batch_size=8,
                                          compensation=compensation)
        assert layered.total < 0.7 * weights < whole.total, layered.describe()
        # the calibration states (128 x 2048 x 4096 in bf16) are the largest fixed part
        assert layered.parts["calibration states"] == 128 * 2048 * 4096 * 2
    assert layer_by_layer_estimate(structure, "bfloat16", n_samples=128, seq_len=2048, batch_size=8,
                                   compensation="none").total < 0.3 * weights


def test_memory_refusal_names_the_estimate_and_the_options(monkeypatch):
    from prunekit.models import memory

    structure = _llama3_8b_structure()
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 4 * 2**30)
    layered = PruneSettings(criterion="activation", layer_by_layer=True,
                            calibration=CalibrationSettings(n_samples=128, seq_len=2048))
    with pytest.raises(InsufficientMemoryError, match=r"prune of llama-8b needs at least .* GiB \(calibration states 2.0 "
                                                      r"GiB.*on the cpu \(one layer at a time\).*lower --calib-samples "
                                                      r"or --calib-seq-len"):
        check_memory("llama-8b", structure, "bfloat16", layered)
    with pytest.raises(InsufficientMemoryError, match="add --layer-by-layer"):
        check_memory("llama-8b", structure, "bfloat16", PruneSettings(criterion="activation"))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 12 * 2**30)
    check_memory("llama-8b", structure, "bfloat16", layered)  # fits on the device; the CPU holds the model


def test_non_finite_weights_are_refused_before_scoring(tokenizer, monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 1] = float("inf")
    import prunekit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "score_loaded", lambda *a, **k: pytest.fail("scored a model with inf weights"))
    with pytest.raises(NonFiniteWeightsError, match=r"weight model.layers.2.mlp.up_proj.weight of .* holds 1 NaN or "
                                                    r"inf value\(s\); the checkpoint is damaged"):
        prune_loaded(model, tokenizer, PruneSettings(criterion="activation"), progress=False,
                     calibration=(IDS, None))
    half = tiny_model("llama").half()
    with torch.no_grad():
        half.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="load it with --dtype bfloat16 or float32"):
        prune_loaded(half, byte_tokenizer(), PruneSettings(criterion="magnitude", compensation="none"), progress=False)


def test_scores_json_with_nan_is_refused_naming_the_file(tmp_path):
    scores = score_model(tiny_model("llama"), "magnitude")
    data = scores.to_dict()
    data["values"]["head"][1][2] = float("nan")
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))  # JSON allows NaN
    with pytest.raises(ScoreError, match=r"scores.json holds NaN or inf scores \(first in layer 1, head\)"):
        Scores.load(path)
    scores.save(path)
    assert Scores.load(path).values.keys() == scores.values.keys()


def test_layer_by_layer_runs_each_layer_only_while_it_alone_is_on_the_device(monkeypatch, tokenizer, one_thread):
    """The contract of the mode, observed through `layer_on`: every layer forward happens inside
    its own layer_on block, blocks never nest, and the model as a whole never runs."""
    import contextlib

    from prunekit.compensate import sequential
    from prunekit.models import layerwise

    model = tiny_model("mistral")
    layers = decoder_layers(model, {"layers": "model.layers"})
    state = {"on": None, "visits": []}
    real_layer_on = layerwise.layer_on

    @contextlib.contextmanager
    def recording_layer_on(layer, device):
        assert state["on"] is None, "two layers on the device at once"
        state["on"] = layer
        state["visits"].append(next(i for i, candidate in enumerate(layers) if candidate is layer))
        with real_layer_on(layer, device):
            yield layer
        state["on"] = None

    for module in (statistics, sequential):
        monkeypatch.setattr(module, "layer_on", recording_layer_on)
    for layer in layers:  # the MLP, not the layer: capturing the embedding calls the layers but runs none
        layer.mlp.register_forward_pre_hook(lambda module, args, layer=layer: None if state["on"] is layer else pytest.fail(
            "a layer ran outside its layer_on block"))
    settings = PruneSettings(target=0.3, criterion="activation", compensation="sequential", batch_size=4,
                             layer_by_layer=True, device="cpu", ffn_multiple=16,
                             calibration=CalibrationSettings(n_samples=len(IDS), seq_len=IDS.shape[1]))
    prune_loaded(model, tokenizer, settings, progress=False, calibration=(IDS, None))
    # one visit per layer to score, one per kept layer to compensate
    assert state["visits"][:4] == [0, 1, 2, 3] and sorted(set(state["visits"][4:])) == state["visits"][4:]


def _gpu_scale():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # as when it runs as a script: its sibling modules import
    spec = importlib.util.spec_from_file_location("gpu_scale", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_benchmark_without_a_gpu_says_so_in_one_sentence(tmp_path, capsys):
    assert _gpu_scale().main(["--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu --shape tiny" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path, one_thread):
    out = tmp_path / "r.json"
    assert _gpu_scale().main(["--device", "cpu", "--shape", "tiny", "--rows", "4", "--seq-len", "16", "--out", str(out),
                              "--only", "activation_sequential,layer_by_layer,sensitivity_layers"]) == 0
    measurements = json.loads(out.read_text())["measurements"]
    assert {name: m["status"] for name, m in measurements.items()} == {
        "activation_sequential": "ok", "layer_by_layer": "ok", "sensitivity_layers": "ok"}
    assert measurements["layer_by_layer"]["weights_stayed_in_cpu_memory"]
    assert measurements["activation_sequential"]["params_after"] < measurements["activation_sequential"]["params_before"]


def test_prune_and_analyze_commands_take_the_device_and_layer_by_layer_options(tmp_path, tokenizer, one_thread):
    from prunekit import load, save_model
    from prunekit.cli import main
    from prunekit.runner.recipe import load_recipe
    from prunekit.runner.stages import validate_settings

    save_model(tiny_model("qwen2"), tokenizer, tmp_path / "model")
    (tmp_path / "text.txt").write_text("The cat sat on the mat. The dog sat on the log. " * 20)
    common = ["--calib", str(tmp_path / "text.txt"), "--calib-samples", "4", "--calib-seq-len", "16", "--device", "cpu",
              "--layer-by-layer", "--criterion", "activation"]
    assert main(["prune", str(tmp_path / "model"), "--target", "0.3", "--out", str(tmp_path / "pruned"), "--ffn-multiple", "16",
                 *common]) == 0
    pruned, _ = load(tmp_path / "pruned")
    assert model_structure(pruned).total_params < model_structure(load(tmp_path / "model")[0]).total_params
    assert main(["analyze", str(tmp_path / "model"), "--out", str(tmp_path / "analysis"), *common]) == 0
    assert Scores.load(tmp_path / "analysis" / "scores.json").criterion == "activation"
    recipe = load_recipe({"model": "m", "stages": ["analyze", "prune"],
                          "prune": {"criterion": "activation", "layer_by_layer": True, "device": "cpu"},
                          "analyze": {"criterion": "block_influence", "layer_by_layer": True}})
    validate_settings(recipe)
    assert recipe.prune.layer_by_layer and recipe.analyze.layer_by_layer
