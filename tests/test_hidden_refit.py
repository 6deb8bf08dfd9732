"""The least-squares refit of the projections that read a hidden-pruned residual stream: exact
where removed channels are linear in kept ones, never worse than plain pruning on the
calibration data, and it leaves the writers (o/down) and a tied head alone."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from prunekit import Plan, apply_plan, architecture_for
from prunekit.compensate.hidden import _readers, norm_output_grams, refit_hidden_readers
from prunekit.compensate.least_squares import refit_kept_columns
from prunekit.models.modeling_prunekit import decoder_layers

KEEP = tuple(range(4, 44))
IDS = torch.randint(3, 259, (8, 24), generator=torch.Generator().manual_seed(2))


def test_removed_channels_linear_in_kept_ones_are_reproduced_exactly():
    generator = torch.Generator().manual_seed(0)
    kept_x = torch.randn(6, 200, generator=generator, dtype=torch.float64)
    x = torch.cat([kept_x, torch.randn(2, 6, generator=generator, dtype=torch.float64) @ kept_x])  # channels 6, 7
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    refit = refit_kept_columns(weight, x @ x.T, torch.arange(6), ridge=1e-12)
    torch.testing.assert_close(refit @ kept_x, weight @ x)


def _error(weight, new_kept, gram, keep):
    """||W_K' X_K - W X||^2 from the Gram matrix."""
    full = torch.zeros_like(weight)
    full[:, keep] = new_kept
    difference = full - weight
    return float(torch.einsum("oi,ij,oj->", difference, gram, difference))


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "qwen2"])
def test_refit_is_never_worse_than_plain_pruning_and_touches_only_readers(family):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    arch = architecture_for(family)
    pairs = [pair for layer in decoder_layers(dense, arch.to_dict()) for pair in _readers(layer, arch)]
    grams = norm_output_grams(dense, [norm for norm, _ in pairs], IDS, progress=False)
    record = refit_hidden_readers(model, Plan(keep_hidden=KEEP), IDS, progress=False)
    refit_pairs = [pair for layer in decoder_layers(model, arch.to_dict()) for pair in _readers(layer, arch)]
    keep = torch.tensor(KEEP)
    assert record["projections"] == sum(len(readers) for _, readers in pairs) + (0 if model.config.tie_word_embeddings else 1)
    for (_, before), (_, after), gram in zip(pairs, refit_pairs, grams):
        for old, new in zip(before, after):
            w = old.weight.detach().double()
            assert _error(w, new.weight.detach().double()[:, keep], gram, keep) <= _error(w, w[:, keep], gram, keep) + 1e-9
            assert not torch.equal(old.weight[:, keep], new.weight[:, keep])
    changed = {name for (name, a), b in zip(dense.state_dict().items(), model.state_dict().values()) if not torch.equal(a, b)}
    assert not any(part in name for name in changed for part in ("o_proj", "down_proj", "norm", "embed_tokens"))
    apply_plan(model, Plan(keep_hidden=KEEP))  # surgery cuts the refit model as any other
    assert model(IDS).logits.isfinite().all()


def test_no_hidden_pruning_refits_nothing():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    assert refit_hidden_readers(model, Plan(), IDS, progress=False)["projections"] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_prune_refits_the_readers_of_a_pruned_hidden_size(tokenizer):
    from conftest import tiny_model

    from prunekit.pipeline import CalibrationSettings, PruneSettings, prune_loaded

    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(target=0.15, basis="total", criterion="activation", prune=("hidden", "channel"), allocation="global",
                             hidden_multiple=8, ffn_multiple=16, compensation="sequential", batch_size=4,
                             calibration=CalibrationSettings(n_samples=8, seq_len=16))
    model = tiny_model("llama")
    record = prune_loaded(model, tokenizer, settings, progress=False, calibration=(ids, None))
    step = record["steps"][0]
    assert step["plan"].get("keep_hidden") and step["hidden_refit"]["projections"] > 0
    assert model.config.hidden_size == len(step["plan"]["keep_hidden"])
