"""FFN channels of Qwen2-MoE's shared expert (issue 23): the dense MLP every token runs, beside the
routed experts, scaled by sigmoid(shared_expert_gate). `keep_shared_expert_channels` plans, surgery,
the `channel` planner move on MoE layers, the criteria that rank them. Removing channels equals
zeroing their gate/up rows; the empty plan is identity; the KV cache agrees with no cache; one
width across the layers saves as the stock family, uneven widths through the remote-code format."""
from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
import torch
from conftest import assert_reloads_as_saved, tiny_moe_model

from prunekit import LayerPlan, Plan, apply_plan, architecture_for, model_structure, predicted_structure
from prunekit.models.modeling_prunekit import decoder_layers, shared_expert_of
from prunekit.plan.plan import PlanError, structure_signature
from prunekit.plan.planner import PlannerSettings, make_plan, max_removable_fraction, removed_fraction
from prunekit.score.scores import Scores

SHARED = 40  # the tiny qwen2_moe's shared expert width (conftest.TINY_MOE_CONFIGS)


def _model(**overrides):
    """A tiny Qwen2-MoE; layer 1 is a dense MLP (mlp_only_layers), as some Qwen-MoE models have."""
    return tiny_moe_model("qwen2_moe", **{"mlp_only_layers": [1], **overrides})


def _shared(model) -> dict[int, torch.nn.Module]:
    arch = architecture_for(model.config.model_type).to_dict()
    return {i: s for i, layer in enumerate(decoder_layers(model, arch)) if (s := shared_expert_of(layer, arch)) is not None}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(seed))


def _kept(layer: int, keep: int, width: int = SHARED) -> tuple[int, ...]:
    """A different set for every layer, so that a mix-up between layers shows."""
    return tuple(sorted(torch.randperm(width, generator=torch.Generator().manual_seed(layer))[:keep].tolist()))


def _plan(model, keep: int | dict[int, int]) -> Plan:
    return Plan(layers={i: LayerPlan(keep_shared_expert_channels=_kept(i, keep[i] if isinstance(keep, dict) else keep))
                        for i in _shared(model)})


@torch.no_grad()
def _zero_removed(model, plan: Plan) -> None:
    """Zero the gate and up rows of the channels `plan` removes: their act(gate) * up is then 0."""
    for i, shared in _shared(model).items():
        removed = [c for c in range(SHARED) if c not in plan.layers[i].keep_shared_expert_channels]
        shared.gate_proj.weight[removed] = 0
        shared.up_proj.weight[removed] = 0


# ----------------------------------------------------------------------------- surgery
@torch.no_grad()
def test_removing_shared_expert_channels_equals_zeroing_them():
    model = _model()
    plan = _plan(model, keep={0: 16, 2: 24, 3: 7})
    zeroed = copy.deepcopy(model)
    _zero_removed(zeroed, plan)
    before = model_structure(model)
    predicted = predicted_structure(plan, before)
    # each MoE layer's own output, on the same input, before the whole-model comparison
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    expected = {i: zeroed.model.layers[i].mlp(x) for i in _shared(model)}
    after = apply_plan(model, plan)
    assert after == predicted
    assert after.total_params == sum(p.numel() for p in model.parameters())
    assert [s.shared_expert_size for s in after.layers] == [16, 0, 24, 7]
    assert [s.intermediate_size for s in after.layers] == [s.intermediate_size for s in before.layers]
    for i, shared in _shared(model).items():
        assert shared.gate_proj.weight.shape[0] == shared.down_proj.weight.shape[1] == len(plan.layers[i].keep_shared_expert_channels)
        torch.testing.assert_close(model.model.layers[i].mlp(x), expected[i], rtol=1e-6, atol=1e-6)
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_shared_channels_beside_routed_expert_pruning():
    """All three MoE structures of a layer at once: each narrows its own weights."""
    model = _model()
    width = model.config.moe_intermediate_size
    plan = Plan(layers={0: LayerPlan(keep_experts=(0, 2, 3, 5), keep_expert_channels=(tuple(range(8)),) * 4,
                                     keep_shared_expert_channels=_kept(0, 8)),
                        1: LayerPlan(keep_channels=tuple(range(0, 80, 2)))})
    predicted = predicted_structure(plan, model_structure(model))
    after = apply_plan(model, plan)
    assert after == predicted
    assert (after.layers[0].num_experts, after.layers[0].intermediate_size, after.layers[0].shared_expert_size) == (4, 8, 8)
    assert after.layers[1].intermediate_size == 40 and after.layers[1].shared_expert_size == 0
    assert _shared(model)[0].up_proj.weight.shape[0] == 8 and width == 24
    assert torch.isfinite(model(_ids()).logits).all()


@torch.no_grad()
def test_keeping_every_shared_channel_is_identity():
    model = _model()
    reference = copy.deepcopy(model)
    plan = _plan(model, keep=SHARED)
    before = model_structure(model)
    assert predicted_structure(plan, before) == before
    assert apply_plan(model, plan) == before
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@torch.no_grad()
def test_kv_cache_equals_no_cache_after_shared_channel_removal():
    model = _model()
    apply_plan(model, _plan(model, keep={0: 8, 2: 16, 3: 24}))
    prompt = _ids()[:1]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_one_shared_width_saves_as_the_stock_family(tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.export.huggingface import save_model

    model = _model()
    apply_plan(model, _plan(model, keep=16))
    config = model.config
    assert config.model_type == "qwen2_moe" and config.shared_expert_intermediate_size == 16
    assert (config.moe_intermediate_size, config.intermediate_size) == (24, 80)  # routed experts and dense layers keep theirs
    save_model(model, None, tmp_path / "out", source="tiny")
    assert not (tmp_path / "out" / "modeling_prunekit.py").exists()
    assert "layer_shapes" not in json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(1)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_uneven_shared_widths_save_with_remote_code(tmp_path):
    from prunekit.export.huggingface import save_model

    model = _model()
    after = apply_plan(model, _plan(model, keep={0: 8, 2: 16, 3: 40}))
    save_model(model, None, tmp_path / "out", source="tiny")
    shapes = json.loads((tmp_path / "out" / "config.json").read_text())["layer_shapes"]
    assert [s.get("shared_expert_size") for s in shapes] == [8, None, 16, 40]
    assert_reloads_as_saved(model, tmp_path / "out", _ids(2), after)


# ----------------------------------------------------------------------------- plans and structure
def test_plan_errors_on_shared_expert_channels():
    structure = model_structure(_model())

    def check(entry: LayerPlan, match: str, layer: int = 0, on=structure) -> None:
        with pytest.raises(PlanError, match=match):
            predicted_structure(Plan(layers={layer: entry}), on)

    check(LayerPlan(keep_shared_expert_channels=()), "keep some, or remove the whole block")
    check(LayerPlan(keep_shared_expert_channels=(0, SHARED)), "out of range")
    check(LayerPlan(keep_shared_expert_channels=(1, 1)), "lists an index twice")
    check(LayerPlan(drop_mlp=True, keep_shared_expert_channels=(0,)), "no MLP left")
    check(LayerPlan(keep_shared_expert_channels=(0,)), "no shared expert.*keep_channels prunes a dense MLP", layer=1)
    check(LayerPlan(keep_shared_expert_channels=(0,)), "no shared expert.*keep_experts",
          on=model_structure(tiny_moe_model("mixtral")))
    # a MoE layer's keep_channels still means its routed experts' channels, and is refused
    check(LayerPlan(keep_channels=(0, 1)), "replace its keep_channels with keep_expert_channels")


def test_plan_json_round_trips_keep_shared_expert_channels(tmp_path):
    plan = Plan(layers={2: LayerPlan(keep_experts=(0, 3), keep_shared_expert_channels=(1, 5, 7)), 3: LayerPlan(drop_mlp=True)})
    assert plan.to_dict()["layers"] == {"2": {"keep_experts": [0, 3], "keep_shared_expert_channels": [1, 5, 7]},
                                        "3": {"drop_mlp": True}}
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").layers == plan.layers
    with pytest.raises(PlanError, match="keep_shared_expert_channels must be a list of integers"):
        Plan.from_dict({"layers": {"2": {"keep_shared_expert_channels": 3}}})


def test_plan_signature_lists_the_shared_width_and_older_plans_still_match():
    model = _model()
    structure = model_structure(model)
    layers = structure_signature(structure)["layers"]
    assert layers[0] == [8, 2, 24, 6, SHARED] and layers[1] == [8, 2, 80]
    older = Plan(layers={0: LayerPlan(keep_shared_expert_channels=(0, 1))},
                 model={**structure_signature(structure), "layers": [entry[:4] for entry in layers]})
    assert predicted_structure(older, structure).layers[0].shared_expert_size == 2
    other = Plan(layers={}, model={**structure_signature(structure), "layers": [entry[:4] + [16] if len(entry) == 5 else entry
                                                                                for entry in layers]})
    with pytest.raises(PlanError, match="made for another model"):
        predicted_structure(other, structure)


def test_structure_costs_the_shared_expert_by_its_channels():
    """Params, FLOPs and the KV cache of the narrowed model, from the structure and from the weights."""
    model = _model()
    before = model_structure(model)
    costs, hidden = before.layer_costs[0], before.hidden_size
    assert costs.per_shared_channel == 3 * hidden
    whole_block = sum(p.numel() for p in model.model.layers[0].mlp.parameters()) + hidden  # + post_attention_layernorm
    assert before.layer_costs[0].params(before.layers[0].mlp_part()) == whole_block
    after = apply_plan(model, _plan(model, keep=8))
    assert after.total_params == sum(p.numel() for p in model.parameters())
    removed = 3 * (SHARED - 8) * 3 * hidden  # three MoE layers
    assert before.total_params - after.total_params == before.non_embedding_params - after.non_embedding_params == removed
    # every token runs the shared expert: 2 FLOPs per weight
    assert before.flops_per_token(16) - after.flops_per_token(16) == 2 * removed
    assert before.kv_cache_bytes_per_token() == after.kv_cache_bytes_per_token()
    assert before.to_dict()["layers"][0]["shared_expert_size"] == SHARED and "shared_expert_size" not in before.to_dict()["layers"][1]


# ----------------------------------------------------------------------------- planner
def _scores(structure, seed: int = 0) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    return Scores("test", {"channel": [torch.rand(s.dense_ffn_width, generator=generator, dtype=torch.float64)
                                       for s in structure.layers]})


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_planner_removes_the_lowest_scored_shared_channels(allocation):
    model = _model()
    structure = model_structure(model)
    scores = _scores(structure)
    plan = make_plan(structure, scores, PlannerSettings(target=0.1, allocation=allocation, prune=("channel",), ffn_multiple=8))
    after = predicted_structure(plan, structure)
    assert removed_fraction(structure, after, "non-embedding") >= 0.1
    shared = [s.shared_expert_size for s in after.layers if s.num_experts]
    assert all(w % 8 == 0 for w in shared) and min(shared) < SHARED
    assert [s.intermediate_size for s in after.layers if s.num_experts] == [24] * 3  # routed experts untouched
    if allocation == "uniform":
        assert len(set(shared)) == 1 and after.is_uniform()
    for layer, entry in plan.layers.items():
        key = "keep_shared_expert_channels" if structure.layers[layer].num_experts else "keep_channels"
        assert set(entry.to_dict()) == {key}
        kept = getattr(entry, key)
        values = scores.values["channel"][layer]
        removed = [c for c in range(len(values)) if c not in kept]
        assert max(values[removed]) <= min(values[list(kept)])
    apply_plan(model, plan)
    assert model_structure(model) == after


def test_planner_counts_shared_channels_in_every_basis():
    structure = model_structure(tiny_moe_model("qwen2_moe"))  # every layer a MoE layer: only shared channels to take
    for basis in ("non-embedding", "total", "flops"):
        settings = PlannerSettings(target=0.1, basis=basis, prune=("channel",), ffn_multiple=8, flops_seq_len=16)
        plan = make_plan(structure, _scores(structure), settings)
        after = predicted_structure(plan, structure)
        assert removed_fraction(structure, after, basis, seq_len=16) >= 0.1
        assert all(set(lp.to_dict()) == {"keep_shared_expert_channels"} for lp in plan.layers.values())
    # the shared expert runs for every token, so its channels buy FLOPs as they buy parameters; not KV cache
    reach = {basis: max_removable_fraction(structure, PlannerSettings(target=0.1, basis=basis, prune=("channel",),
                                                                      ffn_multiple=8, flops_seq_len=16))
             for basis in ("non-embedding", "flops", "kv-cache")}
    assert reach["non-embedding"] > 0.1 and reach["flops"] > 0.1 and reach["kv-cache"] == 0
    # Mixtral has no shared expert, hence no channel to take
    mixtral = model_structure(tiny_moe_model("mixtral"))
    assert max_removable_fraction(mixtral, PlannerSettings(target=0.1, prune=("channel",), ffn_multiple=8)) == 0


def test_planner_refuses_scores_that_do_not_rank_the_shared_channels():
    """A criterion that scores only dense MLPs (activation, taylor, ...) leaves MoE layers' channel
    scores empty: unranked, every shared channel would look free."""
    structure = model_structure(_model())
    scores = Scores("taylor", {"channel": [torch.rand(s.intermediate_size if not s.num_experts else 0, dtype=torch.float64)
                                           for s in structure.layers]})
    with pytest.raises(PlanError, match=r"do not rank the channels of the shared experts of MoE layers \[0, 2, 3\]"):
        make_plan(structure, scores, PlannerSettings(target=0.1, prune=("channel",), ffn_multiple=8))
    # protected layers need no scores
    make_plan(structure, scores, PlannerSettings(target=0.05, prune=("channel",), ffn_multiple=8, protect_layers=(0, 2, 3)))


# ----------------------------------------------------------------------------- criteria
def _norms(shared) -> torch.Tensor:
    return torch.cat([shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight.T], dim=1).double().norm(dim=1)


def test_magnitude_and_random_score_shared_channels(tmp_path):
    from prunekit.pipeline import load_scores_for
    from prunekit.report.analysis import _check_matches
    from prunekit.score import score_model

    model = _model()
    structure = model_structure(model)
    scores = score_model(model, "magnitude", progress=False)
    for layer, shared in _shared(model).items():
        torch.testing.assert_close(scores.values["channel"][layer], _norms(shared))
        assert float(scores.values["mlp"][layer]) == 0  # MoE blocks' magnitudes are as before
    dense = model.model.layers[1].mlp
    torch.testing.assert_close(scores.values["channel"][1], _norms(dense))
    random_scores = score_model(model, "random", progress=False)
    assert [v.numel() for v in random_scores.values["channel"]] == [SHARED, 80, SHARED, SHARED]
    _check_matches(scores, structure)  # the analysis report takes them
    scores.save(tmp_path / "scores.json")  # `prunekit analyze` then `prune --scores`: checked against the model's shape
    assert [v.numel() for v in load_scores_for(tmp_path / "scores.json", structure).values["channel"]] == [SHARED, 80, SHARED, SHARED]


@torch.no_grad()
def test_reap_scores_shared_and_dense_channels_by_gated_activation():
    """Shared expert channel c: mean over tokens of sigmoid(shared gate(x)) |act(gate x) * up x|_c x ||down[:, c]||;
    a dense layer's: the same with gate 1."""
    from prunekit.score import score_model

    model = _model()
    ids = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(7))
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [model.model.layers[i].mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0]))
               for i in range(4)]
    model(ids)
    for handle in handles:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = score_model(model, "reap", ids, progress=False, min_tokens=0)
    for i in range(4):
        mlp = model.model.layers[i].mlp
        ffn = _shared(model).get(i, mlp)
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[i]]).double()
        gate = torch.sigmoid(x @ mlp.shared_expert_gate.weight.double().T) if i in _shared(model) else torch.ones(len(x), 1)
        h = torch.nn.functional.silu(x @ ffn.gate_proj.weight.double().T) * (x @ ffn.up_proj.weight.double().T)
        expected = (gate * h.abs()).mean(0) * ffn.down_proj.weight.double().norm(dim=0)
        torch.testing.assert_close(scores.values["channel"][i], expected, rtol=1e-5, atol=1e-9)
    assert scores.values["expert_channel"][1].numel() == 0 and scores.values["expert_channel"][0].shape == (6, 24)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture
def qwen2_moe_dir(tmp_path, tokenizer):
    """A saved tiny Qwen2-MoE whose shared experts are wide enough for the default --ffn-multiple 64."""
    from prunekit import save_model

    save_model(tiny_moe_model("qwen2_moe", shared_expert_intermediate_size=256), tokenizer, tmp_path / "model")
    words = random.Random(0).choices(["alpha", "beta", "gamma", "delta", "shared", "expert", "token", "7", "?!"], k=3000)
    (tmp_path / "calib.txt").write_text(" ".join(words) + "\n")
    return tmp_path / "model"


@pytest.mark.parametrize("allocation", [None, "uniform"])
def test_cli_prunes_shared_expert_channels(qwen2_moe_dir, tmp_path, capsys, allocation):
    """`prunekit prune DIR --target 0.2 --prune-structures channel` with the defaults (magnitude scores,
    OBS selection, which leaves MoE blocks to the plan): the shared experts narrow, the routed ones stay."""
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main
    from prunekit.models.loading import load

    out = tmp_path / "out"
    args = ["prune", str(qwen2_moe_dir), "--target", "0.2", "--prune-structures", "channel", "--out", str(out),
            "--calib", str(qwen2_moe_dir.parent / "calib.txt"), "--calib-samples", "8", "--calib-seq-len", "32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + (["--allocation", allocation] if allocation else [])) == 0, capsys.readouterr().err
    record = json.loads((out / "prunekit.json").read_text())
    assert record["pruning"]["removed"]["non-embedding"] >= 0.2
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 24 and config["num_experts"] == 6
    ours, _ = load(str(out))
    shapes = model_structure(ours).layers
    assert all(s.intermediate_size == 24 and s.num_experts == 6 and s.shared_expert_size % 64 == 0 for s in shapes)
    assert sum(s.shared_expert_size for s in shapes) < 4 * 256
    if allocation == "uniform":
        assert "layer_shapes" not in config and config["shared_expert_intermediate_size"] < 256
    remote = (out / "modeling_prunekit.py").exists()
    assert remote == ("layer_shapes" in config)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    with torch.no_grad():
        ids = torch.arange(3, 19)[None]
        torch.testing.assert_close(reloaded(ids).logits, ours.eval()(ids).logits, rtol=1e-5, atol=1e-5)
