"""FFN channels inside routed experts (issue 23): `keep_expert_channels` plans, surgery on every MoE
family, the `expert_channel` planner move and its criteria. Removing an expert's channels equals
zeroing them; the empty plan is identity; the KV cache agrees with no cache; one width across the
layers saves as the stock family, uneven widths through the remote-code format."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_reloads_as_saved, tiny_moe_model
from test_moe_cli import moe_dir  # noqa: F401  (the fixture)

from prunekit import LayerPlan, Plan, apply_plan, architecture_for, model_structure, predicted_structure
from prunekit.models.modeling_prunekit import decoder_layers, moe_parts
from prunekit.plan.plan import PlanError

EXPERTS, TOP_K = 6, 2


def _experts(model) -> dict[int, torch.nn.Module]:
    arch = architecture_for(model.config.model_type)
    out = {}
    for index, layer in enumerate(decoder_layers(model, arch.to_dict())):
        parts = moe_parts(getattr(layer, arch.mlp), arch.to_dict())
        if parts is not None:
            out[index] = parts[1]
    return out


def _width(model) -> int:
    return next(iter(_experts(model).values())).down_proj.shape[2]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(seed))


def _kept_channels(layer: int, expert: int, width: int, keep: int) -> tuple[int, ...]:
    """A different set for every (layer, expert), so that a mix-up between experts or layers shows."""
    order = torch.randperm(width, generator=torch.Generator().manual_seed(100 * layer + expert))
    return tuple(sorted(order[:keep].tolist()))


def _plan(model, keep: int | dict[int, int], keep_experts: dict[int, tuple[int, ...]] | None = None) -> Plan:
    width = _width(model)
    layers = {}
    for layer in _experts(model):
        experts = (keep_experts or {}).get(layer, tuple(range(EXPERTS)))
        k = keep[layer] if isinstance(keep, dict) else keep
        channels = tuple(_kept_channels(layer, e, width, k) for e in experts)
        layers[layer] = LayerPlan(keep_experts=experts if keep_experts else None, keep_expert_channels=channels)
    return Plan(layers=layers)


@torch.no_grad()
def _zero_removed(model, plan: Plan) -> None:
    """Zero the removed channels' weights in place (gate and up rows, down columns)."""
    width = _width(model)
    for layer, experts in _experts(model).items():
        lp = plan.layers[layer]
        kept_experts = lp.keep_experts if lp.keep_experts is not None else tuple(range(EXPERTS))
        for e, kept in zip(kept_experts, lp.keep_expert_channels):
            removed = [c for c in range(width) if c not in kept]
            experts.gate_up_proj[e, removed] = 0
            experts.gate_up_proj[e, [c + width for c in removed]] = 0
            experts.down_proj[e][:, removed] = 0


@torch.no_grad()
def test_removing_expert_channels_equals_zeroing_them(moe_family):
    model = tiny_moe_model(moe_family)
    plan = _plan(model, keep=16)
    zeroed = copy.deepcopy(model)
    _zero_removed(zeroed, plan)
    predicted = predicted_structure(plan, model_structure(model))
    after = apply_plan(model, plan)
    assert after == predicted
    assert after.total_params == sum(p.numel() for p in model.parameters())
    x = _ids()
    torch.testing.assert_close(model(x).logits, zeroed(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_expert_channels_beside_expert_removal_equal_masking_and_zeroing(moe_family):
    """Both at once: the kept experts' lists follow keep_experts' order; removed experts are masked."""
    from test_moe import _mask

    model = tiny_moe_model(moe_family)
    sparse = list(_experts(model))
    removed = {layer: (offset % EXPERTS, 4) for offset, layer in enumerate(sparse)}
    keep_experts = {layer: tuple(e for e in range(EXPERTS) if e not in r) for layer, r in removed.items()}
    plan = _plan(model, keep=8, keep_experts=keep_experts)
    reference = copy.deepcopy(model)
    _zero_removed(reference, plan)
    _mask(reference, removed)
    apply_plan(model, plan)
    for layer, experts in _experts(model).items():
        assert experts.gate_up_proj.shape[:2] == (EXPERTS - 2, 2 * 8)
    x = _ids(1)
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_keeping_every_expert_channel_is_identity(moe_family):
    model = tiny_moe_model(moe_family)
    reference = copy.deepcopy(model)
    width = _width(model)
    plan = Plan(layers={layer: LayerPlan(keep_expert_channels=tuple(tuple(range(width)) for _ in range(EXPERTS)))
                        for layer in _experts(model)})
    before = model_structure(model)
    assert predicted_structure(plan, before) == before
    assert apply_plan(model, plan) == before
    x = _ids()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)


@torch.no_grad()
def test_kv_cache_equals_no_cache_after_expert_channel_removal(moe_family):
    model = tiny_moe_model(moe_family)
    apply_plan(model, _plan(model, keep=8))
    prompt = _ids()[:1]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_one_expert_width_saves_as_the_stock_family(moe_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.export.huggingface import save_model

    model = tiny_moe_model(moe_family)
    arch = architecture_for(moe_family)
    dense_width = model.config.intermediate_size
    apply_plan(model, _plan(model, keep=8))
    assert model.config.model_type == moe_family and getattr(model.config, arch.expert_width_key) == 8
    if arch.expert_width_key != "intermediate_size":  # Qwen-MoE: dense layers and the shared expert keep theirs
        assert model.config.intermediate_size == dense_width
    save_model(model, None, tmp_path / "out", source="tiny")
    assert not (tmp_path / "out" / "modeling_prunekit.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    x = _ids(1)
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_uneven_expert_widths_save_with_remote_code(moe_family, tmp_path):
    from prunekit.export.huggingface import save_model

    model = tiny_moe_model(moe_family)
    sparse = list(_experts(model))
    widths = {layer: (8, 16)[i % 2] for i, layer in enumerate(sparse)}
    after = apply_plan(model, _plan(model, keep=widths, keep_experts={sparse[0]: (1, 2, 5)}))
    assert [s.intermediate_size for i, s in enumerate(after.layers) if i in widths] == list(widths.values())
    save_model(model, None, tmp_path / "out", source="tiny")
    assert_reloads_as_saved(model, tmp_path / "out", _ids(2), after)


def test_plan_errors_on_expert_channels():
    model = tiny_moe_model("qwen3_moe")  # layer 1 is dense
    structure = model_structure(model)
    width = structure.layers[0].intermediate_size

    def check(entry: LayerPlan, match: str, layer: int = 0) -> None:
        with pytest.raises(PlanError, match=match):
            predicted_structure(Plan(layers={layer: entry}), structure)

    full = tuple(range(width))
    check(LayerPlan(keep_expert_channels=(full,) * 5), "lists 5 experts, but the layer keeps 6")
    check(LayerPlan(keep_experts=(0, 1), keep_expert_channels=(full,) * 6), "lists 6 experts, but the layer keeps 2")
    check(LayerPlan(keep_expert_channels=((0, 1),) * 5 + ((0, 1, 2),)), "keep the same number in every expert")
    check(LayerPlan(keep_expert_channels=(tuple(range(7)),) * 6), "keep a multiple of 8")
    check(LayerPlan(keep_expert_channels=((),) * 6), "drop_mlp")
    check(LayerPlan(keep_expert_channels=((0, width),) * 6), "out of range")
    check(LayerPlan(keep_expert_channels=((0, 0),) * 6), "lists an index twice")
    check(LayerPlan(keep_expert_channels=((0,),) * 6), "not a mixture-of-experts layer", layer=1)
    check(LayerPlan(drop_mlp=True, keep_expert_channels=((0,),) * 6), "no MLP left")


def test_plan_json_round_trips_keep_expert_channels(tmp_path):
    plan = Plan(layers={2: LayerPlan(keep_experts=(0, 3), keep_expert_channels=((1, 2), (0, 5)))})
    assert plan.to_dict()["layers"] == {"2": {"keep_experts": [0, 3], "keep_expert_channels": [[1, 2], [0, 5]]}}
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").layers == plan.layers
    with pytest.raises(PlanError, match="list of lists of integers"):
        Plan.from_dict({"layers": {"2": {"keep_expert_channels": 3}}})


# ----------------------------------------------------------------------------- planner
def _channel_scores(structure, seed: int = 0):
    from prunekit.score.scores import Scores

    generator = torch.Generator().manual_seed(seed)
    return Scores("test", {"expert_channel": [torch.rand(s.num_experts, s.intermediate_size, generator=generator,
                                                         dtype=torch.float64) if s.num_experts else torch.zeros(0)
                                              for s in structure.layers]})


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_planner_removes_each_experts_lowest_scored_channels(moe_family, allocation):
    from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction

    model = tiny_moe_model(moe_family)
    structure = model_structure(model)
    scores = _channel_scores(structure)
    settings = PlannerSettings(target=0.2, allocation=allocation, prune=("expert_channel",), ffn_multiple=4)
    plan = make_plan(structure, scores, settings)
    after = predicted_structure(plan, structure)
    assert removed_fraction(structure, after, "non-embedding") >= 0.2
    widths = [s.intermediate_size for s in after.layers if s.num_experts]
    assert all(w % 4 == 0 for w in widths) and min(widths) < _width(model)
    if allocation == "uniform":
        assert len(set(widths)) == 1 and after.is_uniform()
    for layer, entry in plan.layers.items():
        assert set(entry.to_dict()) == {"keep_expert_channels"}
        values = scores.values["expert_channel"][layer]
        for e, kept in enumerate(entry.keep_expert_channels):
            removed = [c for c in range(values.shape[1]) if c not in kept]
            # within an expert the removed channels are its own lowest-scored ones
            assert max(values[e, removed]) <= min(values[e, list(kept)])
    apply_plan(model, plan)
    assert model_structure(model).layers == after.layers


def test_planner_counts_expert_channels_in_every_basis(moe_family):
    from prunekit.plan.planner import PlannerSettings, make_plan, max_removable_fraction, removed_fraction

    structure = model_structure(tiny_moe_model(moe_family))
    # FLOPs at 16 positions: over 2048, a tiny model's FLOPs are nearly all attention
    for basis in ("non-embedding", "total", "flops"):
        settings = PlannerSettings(target=0.1, basis=basis, prune=("expert_channel",), ffn_multiple=4, flops_seq_len=16)
        plan = make_plan(structure, _channel_scores(structure), settings)
        assert removed_fraction(structure, predicted_structure(plan, structure), basis, seq_len=16) >= 0.1
    # the top-k experts a token runs through are narrower, so FLOPs fall with the channels (unlike
    # whole experts, which save only router rows); the KV cache does not
    flops = max_removable_fraction(structure, PlannerSettings(target=0.1, basis="flops", prune=("expert_channel",),
                                                              ffn_multiple=4, flops_seq_len=16))
    expert_flops = max_removable_fraction(structure, PlannerSettings(target=0.1, basis="flops", prune=("expert",),
                                                                     flops_seq_len=16))
    assert flops > expert_flops
    assert max_removable_fraction(structure, PlannerSettings(target=0.1, basis="kv-cache", prune=("expert_channel",))) == 0


def test_planner_mixes_experts_and_their_channels(moe_family):
    from prunekit.plan.planner import PlannerSettings, make_plan

    model = tiny_moe_model(moe_family)
    structure = model_structure(model)
    scores = _channel_scores(structure)
    scores.values["expert"] = [torch.rand(s.num_experts, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                               for i, s in enumerate(structure.layers)]
    plan = make_plan(structure, scores, PlannerSettings(target=0.4, prune=("expert", "expert_channel"), ffn_multiple=4))
    predicted = predicted_structure(plan, structure)
    apply_plan(model, plan)
    assert model_structure(model) == predicted
    assert torch.isfinite(model(_ids()).logits).all()


# ----------------------------------------------------------------------------- criteria
def test_magnitude_scores_expert_channels(moe_family):
    from prunekit.score import score_model

    model = tiny_moe_model(moe_family)
    scores = score_model(model, "magnitude", progress=False)
    for layer, experts in _experts(model).items():
        width = experts.down_proj.shape[2]
        expected = torch.stack([torch.cat([experts.gate_up_proj[e, :width], experts.gate_up_proj[e, width:],
                                           experts.down_proj[e].T], dim=1).double().norm(dim=1) for e in range(EXPERTS)])
        torch.testing.assert_close(scores.values["expert_channel"][layer], expected)
    dense = [i for i in range(model.config.num_hidden_layers) if i not in _experts(model)]
    assert all(scores.values["expert_channel"][i].numel() == 0 for i in dense)
    random = score_model(model, "random", progress=False)
    assert [v.shape for v in random.values["expert_channel"]] == [v.shape for v in scores.values["expert_channel"]]


@torch.no_grad()
def test_reap_scores_expert_channels_by_routed_activation(moe_family):
    """Channel c of expert e: sum over routed tokens of gate x |act(gate) * up|_c / all tokens x ||down[:, c]||,
    from the stock router on the block inputs."""
    from prunekit.score import score_model
    from prunekit.score.experts import expert_inner_activations

    model = tiny_moe_model(moe_family)
    ids = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(7))
    arch = architecture_for(moe_family)
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [getattr(decoder_layers(model, arch.to_dict())[i], arch.mlp).register_forward_pre_hook(
        lambda m, args, i=i: inputs.setdefault(i, []).append(args[0])) for i in _experts(model)]
    model(ids)
    for handle in handles:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = score_model(model, "reap", ids, progress=False, min_tokens=0)
    for layer, experts in _experts(model).items():
        router = moe_parts(getattr(decoder_layers(model, arch.to_dict())[layer], arch.mlp), arch.to_dict())[0]
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer]])
        _, weights, index = router(x)
        expected = torch.zeros(EXPERTS, experts.down_proj.shape[2], dtype=torch.float64)
        for e in range(EXPERTS):
            gate = (weights.double() * (index == e)).sum(1)  # the gate value of e per token (0 where not routed)
            inner = expert_inner_activations(x, experts.gate_up_proj[e], experts.act_fn).abs().double()
            expected[e] = (gate[:, None] * inner).sum(0) / x.shape[0] * experts.down_proj[e].double().norm(dim=0)
        torch.testing.assert_close(scores.values["expert_channel"][layer], expected, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("moe_dir", ["mixtral", "qwen3_moe"], indirect=True)
@pytest.mark.parametrize("criterion", ["magnitude", "reap"])
def test_cli_prunes_expert_channels_uniformly_to_a_stock_model(moe_dir, tmp_path, capsys, criterion):
    import json

    from test_moe_cli import _logits

    from prunekit.cli import main

    out = tmp_path / "out"
    args = ["prune", str(moe_dir), "--prune-structures", "expert_channel", "--criterion", criterion, "--target", "0.2",
            "--allocation", "uniform", "--ffn-multiple", "8", "--out", str(out), "--calib", str(moe_dir.parent / "calib.txt"),
            "--calib-samples", "8", "--calib-seq-len", "32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0, capsys.readouterr().err
    assert "saved stock model" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    width_key = architecture_for(config["model_type"]).expert_width_key
    assert config[width_key] in (8, 16) and "layer_shapes" not in config
    assert json.loads((out / "prunekit.json").read_text())["pruning"]["removed"]["non-embedding"] >= 0.2
    assert torch.isfinite(_logits(out)).all()


def test_saved_reap_scores_load_for_prune(tmp_path):
    """`prunekit analyze --criterion reap` then `prune --scores`: the saved expert and expert-channel
    scores are checked against the model's shape and accepted."""
    from prunekit.pipeline import load_scores_for
    from prunekit.score import score_model

    model = tiny_moe_model("qwen3_moe")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_model(model, "reap", ids, progress=False).save(tmp_path / "scores.json")
    loaded = load_scores_for(tmp_path / "scores.json", model_structure(model))
    assert loaded.values["expert_channel"][0].shape == (EXPERTS, model.config.moe_intermediate_size)
