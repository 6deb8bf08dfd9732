"""Allocation search, the measuring half: candidate models assembled from layers pruned once.

For every (layer, position on its chain) that the search visits, the dense layer is copied, its
output projections are refit by least squares on the dense model's own inputs (the Gram matrices
of one calibration pass: heads and FFN channels see the same inputs in a candidate as in the
dense model), and it is cut to that position. A candidate model is the dense model with some of
its layers swapped for such pruned copies, so it is assembled, never recomputed. Its fitness is
the mean KL divergence of its next-token distribution from the dense model's, on calibration
rows that built nothing (the scores and the Gram matrices come from the other rows).

The search loop itself is `prunekit.plan.search.evolve`; the plan it ends with is an ordinary
plan, which the pipeline then compensates and cuts like any other.
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from prunekit.compensate.least_squares import DEFAULT_RIDGE, refit_kept_columns
from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.plan.plan import KeptLayer, Plan, resolve_plan, structure_signature
from prunekit.plan.planner import PlannerSettings, SearchSpace, plan_at, search_space
from prunekit.plan.search import Positions, SearchSettings, evolve
from prunekit.prune.surgery import prune_layer
from prunekit.score.scores import Scores
from prunekit.score.statistics import LayerStats, collect_layer_stats

# The dense model's log-probabilities on the held-out rows are kept for the whole search; float16
# halves them (32 rows x 512 x 49,152 for SmolLM2: 1.6 GB) at an error far below the KL differences
# the search ranks.
REFERENCE_DTYPE = torch.float16


@torch.no_grad()
def dense_log_probs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log p(next token) of `model` on every position of `ids` [rows, seq], as REFERENCE_DTYPE."""
    device = next(model.parameters()).device
    chunks = [F.log_softmax(model(input_ids=rows.to(device), use_cache=False).logits.float(), -1).to(REFERENCE_DTYPE)
              for rows in ids.split(batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def mean_kl(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor, batch_size: int) -> float:
    """Mean over positions of KL(dense || model), the dense log-probabilities given as `reference`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for rows, dense in zip(ids.split(batch_size), reference.split(batch_size)):
        log_q = F.log_softmax(model(input_ids=rows.to(device), use_cache=False).logits.float(), -1)
        log_p = dense.to(device).float()
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += rows.numel()
    return total / count


def refit_outputs(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, stats: LayerStats, head_dim: int,
                  ridge: float) -> None:
    """Least-squares refit, in place, of the columns of o_proj / down_proj that `kept` keeps."""
    jobs = []
    if kept.query_heads and len(kept.query_heads) < before.num_attention_heads:
        columns = [h * head_dim + d for h in kept.query_heads for d in range(head_dim)]
        jobs.append((getattr(getattr(layer, arch.attention), arch.o_proj), stats.attention_input, columns))
    if kept.channels and len(kept.channels) < before.intermediate_size:
        jobs.append((getattr(getattr(layer, arch.mlp), arch.down_proj), stats.mlp_input, list(kept.channels)))
    for projection, features, columns in jobs:
        weight = projection.weight
        keep = torch.tensor(columns, dtype=torch.long, device=weight.device)
        refit = refit_kept_columns(weight.detach(), features.gram.to(weight.device), keep, ridge)
        with torch.no_grad():
            weight[:, keep] = refit.to(weight.dtype)


def eval_rows(device: torch.device | str) -> int:
    """Rows per forward pass of a candidate: the logits of a row are seq_len x vocab floats."""
    return 2 if str(device).startswith("cpu") else 8


def search_memory_parts(structure: ModelStructure, search: SearchSettings, *, seq_len: int, weight_bytes: int,
                        device: str) -> dict[str, int]:
    """What the search holds beyond the model: the dense log-probabilities, the logits of one
    forward pass with their log-softmax, the Gram matrices and the cache of pruned layers."""
    vocab = structure.vocab_size
    grams = sum(shape.intermediate_size ** 2 + (shape.num_attention_heads * structure.head_dim) ** 2
                for shape in structure.layers) * 8
    layers = structure.non_embedding_params * weight_bytes
    return {"search: dense log-probs": search.held_out_rows * seq_len * vocab * REFERENCE_DTYPE.itemsize,
            "search: logits": 3 * eval_rows(device) * seq_len * vocab * 4,
            "search: Gram matrices": grams,
            "search: pruned layers": int(CACHED_LAYER_SETS * layers)}


# The cache of pruned layers holds at most this many copies of the model's layers (in entries:
# CACHED_LAYER_SETS x num_layers); older entries the parent does not use are dropped, then rebuilt if needed.
CACHED_LAYER_SETS = 4


class CandidateLayers:
    """Pruned copies of the dense layers, built on first use and kept; `assembled` swaps them in."""

    def __init__(self, model: nn.Module, space: SearchSpace, structure: ModelStructure, scores: Scores,
                 settings: PlannerSettings, stats: list[LayerStats] | None, *, ridge: float, comparable: bool):
        self.model, self.space, self.structure = model, space, structure
        self.scores, self.settings, self.stats = scores, settings, stats
        self.ridge, self.comparable = ridge, comparable
        self.arch = architecture_for(model.config.model_type)
        self.layers = decoder_layers(model, self.arch.to_dict())
        self.dense = list(self.layers)
        self.built: dict[tuple[int, int], nn.Module] = {}  # in order of last use
        self.builds = 0

    def layer(self, index: int, position: int) -> nn.Module:
        if position == 0:
            return self.dense[index]
        key = (index, position)
        if key in self.built:
            self.built[key] = self.built.pop(key)  # most recently used last
        else:
            self.builds += 1
            self.built[key] = self._build(index, position)
            if len(self.built) > CACHED_LAYER_SETS * len(self.dense):
                del self.built[next(iter(self.built))]
        return self.built[key]

    @torch.no_grad()
    def _build(self, index: int, position: int) -> nn.Module:
        positions = [0] * len(self.space.chains)
        positions[index] = position
        plan = plan_at(self.space, positions, self.structure, self.scores, self.settings, comparable=self.comparable)
        kept = resolve_plan(plan, self.structure)[index]
        before = self.structure.layers[index]
        layer = copy.deepcopy(self.dense[index])
        if self.stats is not None:
            refit_outputs(layer, self.arch, kept, before, self.stats[index], self.structure.head_dim, self.ridge)
        prune_layer(layer, self.arch, kept, before, self.model.config, self.structure.head_dim)
        return layer

    @contextmanager
    def assembled(self, positions: Positions):
        """The model with layer i at positions[i] of its chain, for the duration of the block."""
        try:
            for index, position in enumerate(positions):
                self.layers[index] = self.layer(index, position)
            yield self.model
        finally:
            for index, layer in enumerate(self.dense):
                self.layers[index] = layer


def search_key(structure: ModelStructure, settings: PlannerSettings, search: SearchSettings, scores: Scores,
               held_out: torch.Tensor) -> str:
    """What a saved search state must match to be resumed: the model's shape, the settings, the
    scores and the held-out rows; not the budget, so a search killed or finished can go on with more."""
    loop = {k: v for k, v in search.to_dict().items() if k not in ("generations", "minutes")}
    digest = hashlib.sha256(json.dumps([structure_signature(structure), settings.to_dict(), loop],
                                       sort_keys=True, default=str).encode())
    for kind in sorted(scores.values):
        for value in scores.values[kind]:
            digest.update(value.detach().double().cpu().numpy().tobytes())
    digest.update(held_out.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def search_allocation(model: nn.Module, scores: Scores, settings: PlannerSettings, search: SearchSettings,
                      build_ids: torch.Tensor, held_out_ids: torch.Tensor, *, comparable: bool = True,
                      refit: bool = True, ridge: float = DEFAULT_RIDGE, batch_size: int = 8, device: str | None = None,
                      state_path: Path | None = None, progress: bool = True) -> tuple[Plan, dict]:
    """Search the per-layer allocation of `settings.target`; returns the plan and the search's record."""
    structure = model_structure(model)
    space = search_space(structure, scores, settings, comparable=comparable)
    stats = (collect_layer_stats(model, build_ids, batch_size=batch_size, with_gram=True, progress=progress, device=device)
             if refit else None)
    model.eval()
    eval_batch = max(1, min(batch_size, eval_rows(next(model.parameters()).device)))
    reference = dense_log_probs(model, held_out_ids, eval_batch)
    candidates = CandidateLayers(model, space, structure, scores, settings, stats, ridge=ridge, comparable=comparable)
    measured: dict[tuple[Positions, int], float] = {}

    def fitness(positions: Positions, rows: int) -> float:
        if (positions, rows) not in measured:
            with candidates.assembled(positions) as candidate:
                measured[(positions, rows)] = mean_kl(candidate, held_out_ids[:rows], reference[:rows], eval_batch)
        return measured[(positions, rows)]

    key = search_key(structure, settings, search, scores, held_out_ids)
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    result = evolve(space, fitness, search, state_path=state_path, key=key, progress=progress)
    record = {**result.to_dict(), "start": list(space.start), "goal": space.goal, "basis": settings.basis,
              "removed_per_layer": space.removed_per_layer(result.positions),
              "start_removed_per_layer": space.removed_per_layer(space.start),
              "candidate_layers_built": candidates.builds, "settings": search.to_dict()}
    plan = plan_at(space, result.positions, structure, scores, settings, comparable=comparable,
                   meta={"search": {"fitness": result.fitness, "start_fitness": result.start_fitness,
                                    "generations": len(result.trace) - 1, "positions": list(result.positions)}})
    del candidates, reference, stats
    return plan, record


__all__ = ["CandidateLayers", "dense_log_probs", "eval_rows", "mean_kl", "refit_outputs", "search_allocation",
           "search_key", "search_memory_parts"]
