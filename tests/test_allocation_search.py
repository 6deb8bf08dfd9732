"""Allocation search: the chains replay global allocation exactly, mutations keep the target, the
loop is deterministic and resumes after a kill, candidates assembled from cached layers equal
models pruned by surgery, and `prunekit prune --allocation search` runs end to end."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import tiny_model

from prunekit import PlanError, apply_plan, model_structure, predicted_structure
from prunekit.compensate import compensate
from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded, save_pruned
from prunekit.plan.planner import PlannerSettings, make_plan, plan_at, removed_fraction, search_space
from prunekit.plan.search import SearchSettings, SearchState, evolve, mutate
from prunekit.prune.allocation_search import CandidateLayers, dense_log_probs, mean_kl, search_allocation
from prunekit.report.run_report import write_run_report
from prunekit.score import collect_layer_stats, score_model

FFN, MULTIPLE, LAYERS = 128, 16, 6
IDS = torch.randint(3, 200, (12, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", intermediate_size=FFN, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def scores(model):
    return score_model(model, "taylor", IDS[:8], batch_size=4)


def _settings(target=0.3, **overrides):
    return PlannerSettings(target=target, allocation="search", ffn_multiple=MULTIPLE, **overrides)


def test_the_search_starts_from_the_global_plan(model, scores):
    structure = model_structure(model)
    space = search_space(structure, scores, _settings())
    start = plan_at(space, space.start, structure, scores, _settings())
    default = make_plan(structure, scores, PlannerSettings(target=0.3, ffn_multiple=MULTIPLE))
    assert start.layers == default.layers
    assert space.removed(space.start) >= space.goal
    assert plan_at(space, [0] * LAYERS, structure, scores, _settings()).is_empty()
    for chain in space.chains:  # each move removes something, and the chain ends where no width move is left
        assert all(b > a for a, b in zip(chain.removed, chain.removed[1:]))


def test_every_mutation_keeps_the_target_and_only_the_target(model, scores):
    structure = model_structure(model)
    space = search_space(structure, scores, _settings())
    rng = random.Random(0)
    smallest_step = min(b - a for c in space.chains for a, b in zip(c.removed, c.removed[1:]))
    largest_step = max(b - a for c in space.chains for a, b in zip(c.removed, c.removed[1:]))
    children = {mutate(space.start, space, rng, 3) for _ in range(50)}
    assert len(children) > 10
    for child in children:
        assert space.goal <= space.removed(child) < space.goal + largest_step + smallest_step
        plan = plan_at(space, child, structure, scores, _settings())
        achieved = removed_fraction(structure, predicted_structure(plan, structure), "non-embedding")
        assert achieved >= 0.3 - 1e-9


def _toy_fitness(space):
    """A fitness whose optimum is known: layer i costs (i + 1) per unit of basis removed there."""
    def fitness(positions, rows):
        return sum((i + 1) * chain.removed[p] for i, (chain, p) in enumerate(zip(space.chains, positions))) / space.goal
    return fitness


def test_the_search_lowers_the_fitness_and_is_deterministic(model, scores):
    space = search_space(model_structure(model), scores, _settings())
    fitness = _toy_fitness(space)
    settings = SearchSettings(generations=30, offspring=6, held_out_rows=4, seed=3)
    first = evolve(space, fitness, settings, progress=False)
    again = evolve(space, fitness, settings, progress=False)
    assert first.positions == again.positions and first.trace == again.trace
    assert first.fitness < first.start_fitness
    assert [t["fitness"] for t in first.trace] == sorted((t["fitness"] for t in first.trace), reverse=True)
    # the cheap first layers lose more than the costly last ones
    removed = [c.removed[p] for c, p in zip(space.chains, first.positions)]
    assert removed[0] > removed[-1]


def test_a_killed_search_resumes_where_it_stopped(model, scores, tmp_path):
    space = search_space(model_structure(model), scores, _settings())
    fitness = _toy_fitness(space)
    settings = SearchSettings(generations=12, offspring=4, held_out_rows=4, seed=1)
    straight = evolve(space, fitness, settings, progress=False)

    calls = {"n": 0}

    def dies_midway(positions, rows):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt  # killed during generation 7 or so
        return fitness(positions, rows)

    state_path = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        evolve(space, dies_midway, settings, state_path=state_path, key="k", progress=False)
    saved = SearchState.load(state_path, "k")
    assert 0 < saved.generation < 12
    assert SearchState.load(state_path, "another search") is None
    resumed = evolve(space, fitness, settings, state_path=state_path, key="k", progress=False)
    assert resumed.resumed_at == saved.generation
    assert resumed.positions == straight.positions and resumed.trace == straight.trace


def test_an_assembled_candidate_equals_the_model_pruned_and_refit_by_surgery(model, scores):
    structure = model_structure(model)
    settings = _settings()
    space = search_space(structure, scores, settings)
    stats = collect_layer_stats(model, IDS[:8], batch_size=4, with_gram=True, progress=False)
    candidates = CandidateLayers(model, space, structure, scores, settings, stats, ridge=1e-3, comparable=True)
    dense_logits = model(IDS).logits
    positions = mutate(space.start, space, random.Random(5), 3)
    with candidates.assembled(positions) as assembled:
        candidate_logits = assembled(IDS).logits
    pruned = copy.deepcopy(model)
    plan = plan_at(space, positions, structure, scores, settings)
    compensate(pruned, plan, stats, ridge=1e-3)
    apply_plan(pruned, plan)
    torch.testing.assert_close(candidate_logits, pruned(IDS).logits, rtol=1e-4, atol=1e-5)
    # the dense layers are back afterwards, and position 0 everywhere is the dense model
    torch.testing.assert_close(model(IDS).logits, dense_logits, rtol=0, atol=0)
    with candidates.assembled([0] * LAYERS) as assembled:
        torch.testing.assert_close(assembled(IDS).logits, dense_logits, rtol=0, atol=0)


def test_kl_is_zero_for_the_dense_model_and_positive_for_a_pruned_one(model, scores):
    reference = dense_log_probs(model, IDS[8:], batch_size=2)
    assert mean_kl(model, IDS[8:], reference, batch_size=3) == pytest.approx(0, abs=1e-4)
    plan, record = search_allocation(model, scores, _settings(), SearchSettings(generations=2, offspring=3, held_out_rows=4),
                                     IDS[:8], IDS[8:], progress=False)
    assert record["fitness"] <= record["start_fitness"] and record["start_fitness"] > 1e-4
    assert plan.meta["achieved"] >= 0.3 and plan.meta["search"]["positions"] == record["positions"]


def test_prune_with_allocation_search_end_to_end(tokenizer, tmp_path):
    model = tiny_model("llama", intermediate_size=FFN, num_hidden_layers=LAYERS)
    settings = PruneSettings(target=0.3, allocation="search", ffn_multiple=MULTIPLE, batch_size=4,
                             search=SearchSettings(generations=3, offspring=3, held_out_rows=4),
                             calibration=CalibrationSettings(n_samples=len(IDS), seq_len=IDS.shape[1]))
    work = tmp_path / "work"
    record = prune_loaded(model, tokenizer, settings, progress=False, calibration=(IDS, None), work_dir=work)
    assert record["removed"]["non-embedding"] >= 0.3
    assert len(record["search"]["trace"]) == 4 and (work / "search-state-1.json").is_file()
    # the same prune with a larger budget goes on from the saved state instead of starting again
    longer = PruneSettings(**{**settings.__dict__, "search": SearchSettings(generations=5, offspring=3, held_out_rows=4)})
    again = prune_loaded(tiny_model("llama", intermediate_size=FFN, num_hidden_layers=LAYERS), tokenizer, longer,
                         progress=False, calibration=(IDS, None), work_dir=work)
    assert again["search"]["resumed_at"] == 3 and again["search"]["trace"][:4] == record["search"]["trace"]
    assert record["steps"][0]["plan"]["meta"]["search"]["generations"] == 3
    # the saved model carries the trace, and the run report draws it
    save_pruned(model, tokenizer, tmp_path / "run" / "model", record, source="tiny-llama")
    report = write_run_report(tmp_path / "run").read_text()
    assert "### Allocation search" in report and "allocation_search.png" in report
    assert list((tmp_path / "run").rglob("allocation_search.png"))


def test_a_given_calibration_must_leave_rows_to_score_on(tokenizer):
    settings = PruneSettings(target=0.3, allocation="search", search=SearchSettings(held_out_rows=12))
    with pytest.raises(PlanError, match="only 12 were given"):
        prune_loaded(tiny_model("llama"), tokenizer, settings, progress=False, calibration=(IDS, None))


@pytest.mark.parametrize("overrides, match", [
    (dict(layer_by_layer=True, device="cpu"), "layer by layer"),
    (dict(prune=("channel", "layer")), "cannot remove \\['layer'\\]"),
    (dict(limits={"head": 0.2}), "does not take limits"),
    (dict(search=SearchSettings(generations=0)), "generations must be at least 1"),
    (dict(search=SearchSettings(minutes=0)), "minutes must be positive"),
])
def test_bad_search_settings_are_refused_before_any_work(overrides, match):
    with pytest.raises(PlanError, match=match):
        PruneSettings(allocation="search", **overrides).validate()


def test_make_plan_says_where_the_search_runs(model, scores):
    with pytest.raises(PlanError, match="needs the model and calibration data"):
        make_plan(model_structure(model), scores, _settings())


def test_the_cli_searches_and_leaves_no_state_behind(tmp_path, tokenizer):
    from prunekit import save_model
    from prunekit.cli import main

    save_model(tiny_model("qwen3", intermediate_size=FFN, num_hidden_layers=LAYERS), tokenizer, tmp_path / "model")
    (tmp_path / "text.txt").write_text("The cat sat on the mat. The dog sat on the log. " * 200)
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "model"), "--target", "0.3", "--allocation", "search", "--search-generations",
                 "2", "--search-offspring", "3", "--ffn-multiple", str(MULTIPLE), "--calib", str(tmp_path / "text.txt"),
                 "--calib-samples", "8", "--calib-seq-len", "16", "--out", str(out)]) == 0
    pruning = json.loads((out / "prunekit.json").read_text())["pruning"]
    assert len(pruning["search"]["trace"]) == 3 and pruning["removed"]["non-embedding"] >= 0.3
    assert not list(tmp_path.glob(".out.resume*"))  # removed once the model is saved
