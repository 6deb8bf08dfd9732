"""Expert criteria (issue 23): REAP and routing frequency on tiny random MoE models, checked
against a direct computation from the router and every expert's output; the warning about experts
that too few calibration tokens reached; scores that plan and cut."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_moe_model

from prunekit import architecture_for, model_structure
from prunekit.models.modeling_prunekit import decoder_layers, moe_parts
from prunekit.score import CRITERIA, score_model
from prunekit.score.experts import expert_output_norms
from prunekit.score.scores import ScoreError

EXPERTS, TOP_K = 6, 2


def _calibration(rows: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 259, (rows, seq), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _direct_scores(model, ids):
    """REAP and frequency per MoE layer, from the block inputs: the stock router picks top-k, every
    expert runs on every token, and only the routed (token, expert) pairs count."""
    arch = architecture_for(model.config.model_type)
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model, arch.to_dict())):
        mlp = getattr(layer, arch.mlp)
        if moe_parts(mlp, arch.to_dict()) is not None:
            handles.append(mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0])))
    model(ids)
    for h in handles:
        h.remove()
    reap, frequency = {}, {}
    for i, xs in inputs.items():
        router, experts = moe_parts(getattr(decoder_layers(model, arch.to_dict())[i], arch.mlp), arch.to_dict())
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        _, weights, index = router(x)
        total = torch.zeros(EXPERTS, dtype=torch.float64)
        count = torch.zeros(EXPERTS, dtype=torch.float64)
        for e in range(EXPERTS):
            norms = expert_output_norms(x, experts.gate_up_proj[e], experts.down_proj[e], experts.act_fn).double()
            routed = (index == e)
            count[e] = routed.sum()
            total[e] = (weights.double() * routed * norms[:, None]).sum()
        reap[i] = total / count.clamp_min(1)
        frequency[i] = count / x.shape[0]
    return reap, frequency


def test_expert_criteria_are_registered():
    assert CRITERIA["frequency"].kinds == ("expert",)
    # REAP's channel analogue too, inside routed experts and (gated by its sigmoid) in a shared expert
    assert CRITERIA["reap"].kinds == ("expert", "expert_channel", "channel")


def test_reap_and_frequency_match_direct_computation(moe_family):
    model = tiny_moe_model(moe_family)
    ids = _calibration()
    reap_direct, frequency_direct = _direct_scores(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reap = score_model(model, "reap", ids, progress=False, min_tokens=0)
        frequency = score_model(model, "frequency", ids, progress=False, min_tokens=0)
    structure = model_structure(model)
    for i, shape in enumerate(structure.layers):
        assert reap.values["expert"][i].numel() == shape.num_experts
        if shape.num_experts:
            torch.testing.assert_close(reap.values["expert"][i], reap_direct[i], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(frequency.values["expert"][i], frequency_direct[i], rtol=0, atol=1e-12)
            # each token goes to top-k experts
            assert float(frequency.values["expert"][i].sum()) == pytest.approx(TOP_K)
    assert sum(reap.meta["expert_tokens"][i][e] for i in reap_direct for e in range(EXPERTS)) == TOP_K * ids.numel() * len(reap_direct)


def test_few_calibration_tokens_warn_naming_the_experts(moe_family):
    model = tiny_moe_model(moe_family)
    ids = _calibration(rows=1, seq=3)  # 3 tokens x top-2 over 6 experts: some get none
    with pytest.warns(UserWarning, match=r"fewer than 16 calibration tokens \(layer \d+: experts \[.*calibrate on more samples"):
        scores = score_model(model, "reap", ids, progress=False)
    assert scores.meta["under_routed"]
    unreached = [e for e, n in enumerate(scores.meta["expert_tokens"][0]) if n == 0]
    assert all(float(scores.values["expert"][0][e]) == 0 for e in unreached)


def test_expert_criteria_refuse_a_dense_model():
    from conftest import tiny_model

    with pytest.raises(ScoreError, match="no mixture-of-experts layers"):
        score_model(tiny_model("llama"), "reap", _calibration(), progress=False)


def test_reap_scores_plan_and_cut(moe_family):
    from prunekit import apply_plan
    from prunekit.plan.planner import PlannerSettings, make_plan

    model = tiny_moe_model(moe_family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = score_model(model, "reap", _calibration(), progress=False)
    structure = model_structure(model)
    plan = make_plan(structure, scores, PlannerSettings(target=0.25, prune=("expert",)), comparable=False)
    after = apply_plan(model, plan)
    assert after.non_embedding_params <= 0.75 * structure.non_embedding_params
    assert torch.isfinite(model(_calibration(1, 8)).logits).all()


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_dense_criteria_score_attention_of_moe_models(moe_family, criterion):
    """Heads and KV groups of a MoE model score and prune with the dense criteria; the experts'
    MLP blocks get no channel scores from activation and taylor; magnitude scores a shared expert's."""
    from prunekit import apply_plan
    from prunekit.plan.planner import PlannerSettings, make_plan

    model = tiny_moe_model(moe_family)
    ids = _calibration()
    scores = score_model(model, criterion, ids, ids, progress=False)
    structure = model_structure(model)
    for i, shape in enumerate(structure.layers):
        assert scores.values["head"][i].numel() == shape.num_attention_heads
        shared = shape.shared_expert_size if criterion == "magnitude" else 0
        assert scores.values["channel"][i].numel() == (shared if shape.num_experts else shape.intermediate_size)
    plan = make_plan(structure, scores, PlannerSettings(target=0.1, prune=("head", "kv_group")),
                     comparable=CRITERIA[criterion].comparable)
    if architecture_for(moe_family).attention_norms_span_heads:  # OLMoE refuses head pruning
        with pytest.raises(Exception, match="normalises queries and keys over all heads"):
            apply_plan(model, plan)
        return
    apply_plan(model, plan)
    assert torch.isfinite(model(ids[:1]).logits).all()


def test_analysis_report_takes_expert_scores(tmp_path):
    from prunekit.report.analysis import write_analysis_report

    model = tiny_moe_model("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = score_model(model, "frequency", _calibration(), progress=False)
    write_analysis_report(scores, model_structure(model), tmp_path, title="frequency analysis", calibration={})
    assert "`expert`" in (tmp_path / "analysis.md").read_text()
