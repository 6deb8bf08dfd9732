"""From scores to a plan: remove the least important structures until a target is met.

Moves, each removing one unit of structure from a layer (or from every layer, for `uniform`):
    channel   - the `ffn_multiple` lowest-scored FFN channels (widths stay multiples of it); on a MoE
                layer, the channels of its shared expert (Qwen2-MoE), a dense MLP every token runs
    head      - the lowest-scored query head of every kept KV group (GQA stays balanced)
    kv_group  - the lowest-scored KV group with its query heads
    attention / mlp - the whole sublayer;  layer - the whole decoder layer
    hidden    - the `hidden_multiple` lowest-scored residual channels, from every layer, the embedding
                and the output head at once (the hidden size stays a multiple of it)
    expert    - the lowest-scored routed expert of a mixture-of-experts layer (at least one stays)
    expert_channel - the lowest-scored channels of every routed expert of a MoE layer, each expert its
                own, down to the next multiple of lcm(`ffn_multiple`, 8) (the experts of a layer keep
                one width; 8, because transformers' grouped expert kernel needs 16-byte rows)
A move costs the damage its scores predict and buys a reduction of the target basis (params,
FLOPs or KV cache). The greedy loop takes the move with the least damage per unit bought.
Allocation decides the scope of a move: `global` ranks moves across all layers, `uniform`
applies each width move to every layer at once (the result exports as a stock model),
`adaptive` first gives each layer a budget from its importance (less important layers lose
more, in the spirit of OWL / Adapt-Pruner), then fills each budget with the layer's best moves.
`log_increase` needs no scores across layers: layer i of L loses a share proportional to
1 + spread log(1 + i) / log(L) (SlimGPT's incremental ratio; the default spread 3 makes the last layer
lose four times the first's share), scaled to the target; what goes inside a layer is then for the scores, or structured OBS, to pick.
`search` plans from positions on per-layer chains (`search_space`): each layer's width moves in
the order its scores rank them; how far each layer goes along its chain is decided by measuring
assembled candidates (`prunekit.prune.allocation_search`), not by summing scores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from prunekit.models.structure import LayerShape, ModelStructure
from prunekit.plan.plan import EXPERT_WIDTH_MULTIPLE, LayerPlan, Plan, PlanError, structure_signature
from prunekit.score.scores import Scores

BASES = ("non-embedding", "total", "flops", "kv-cache")
ALLOCATIONS = ("uniform", "global", "adaptive", "search", "slimllm", "adapt_pruner", "log_increase")
MOVE_KINDS = ("channel", "head", "kv_group", "attention", "mlp", "layer", "hidden", "expert", "expert_channel")
WIDTH_KINDS = ("channel", "head", "kv_group")
# The settings of allocations that take any (--allocation-option KEY=VALUE, prune.allocation_options):
# SlimLLM's softmax temperature (default: 10 at 20% removed, 7 at 50%), Adapt-Pruner's skew (default 1),
# log_increase's spread (default 3: the last layer loses 4x the first's share; 0 is uniform).
ALLOCATION_OPTIONS = {"slimllm": ("alpha",), "adapt_pruner": ("amplitude",), "log_increase": ("spread",)}


@dataclass(frozen=True)
class PlannerSettings:
    target: float                          # fraction of the basis to remove, in (0, 1)
    basis: str = "non-embedding"
    allocation: str = "global"
    prune: tuple[str, ...] = ("channel", "head", "kv_group")
    limits: dict[str, float] = field(default_factory=dict)   # kind -> max fraction of its units removed
    ffn_multiple: int = 64
    hidden_multiple: int = 64
    protect_layers: tuple[int, ...] = ()
    adaptive_strength: float = 0.5         # how far layer budgets spread around the target (0 = uniform)
    flops_seq_len: int = 2048
    allocation_options: dict[str, float] = field(default_factory=dict)  # ALLOCATION_OPTIONS of the allocation

    def validate(self) -> None:
        if not 0 < self.target < 1:
            raise PlanError(f"target {self.target} must be a fraction in (0, 1), e.g. 0.3 for 30% removed")
        if self.basis not in BASES:
            raise PlanError(f"unknown basis {self.basis!r}; choose one of {list(BASES)}")
        if self.allocation not in ALLOCATIONS:
            raise PlanError(f"unknown allocation {self.allocation!r}; choose one of {list(ALLOCATIONS)}")
        check_allocation_options(self.allocation, self.allocation_options)
        unknown = set(self.prune) - set(MOVE_KINDS)
        if unknown or not self.prune:
            raise PlanError(f"unknown structures to prune {sorted(unknown)}; choose from {list(MOVE_KINDS)}")
        bad_limits = set(self.limits) - set(MOVE_KINDS)
        if bad_limits:
            raise PlanError(f"limits name unknown structures {sorted(bad_limits)}; choose from {list(MOVE_KINDS)}")
        for kind, limit in self.limits.items():
            if not 0 <= limit <= 1:
                raise PlanError(f"limit for {kind} is {limit}; a limit is a fraction in [0, 1]")
        if self.ffn_multiple < 1:
            raise PlanError(f"ffn_multiple must be at least 1, got {self.ffn_multiple}")
        if self.hidden_multiple < 1:
            raise PlanError(f"hidden_multiple must be at least 1, got {self.hidden_multiple}")
        if self.allocation == "search":
            beyond_widths = sorted(set(self.prune) - set(WIDTH_KINDS))
            if beyond_widths:
                raise PlanError(f"allocation 'search' searches per-layer widths {list(WIDTH_KINDS)} and cannot remove "
                                f"{beyond_widths} yet; prune only widths with it, or use global allocation")
            if self.limits:
                raise PlanError("allocation 'search' does not take limits; drop them or use global allocation")
        if self.allocation == "uniform" and {"attention", "mlp"} & set(self.prune):
            raise PlanError("uniform allocation keeps every layer alike, so it cannot remove single sublayers; "
                            "use global or adaptive allocation, or prune layers instead")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- state
@dataclass
class _LayerState:
    index: int
    groups: list[int]                 # kept KV groups, least important first
    heads_by_group: dict[int, list[int]]   # kept query heads of each group, least important first
    channels: list[int]               # kept channels (of a MoE layer: its shared expert's), least important first
    attention: bool
    mlp: bool
    dropped: bool = False
    damage: dict[str, float] = field(default_factory=lambda: {"attention": 0.0, "mlp": 0.0})
    experts: list[int] = field(default_factory=list)  # kept routed experts of a MoE layer, least important first
    moe: bool = False                 # a MoE layer: each expert has its own channels; `channels` are the shared expert's
    # kept channels of every routed expert (removed ones too), least important first; one width for all
    expert_channels: dict[int, list[int]] = field(default_factory=dict)

    def shape(self) -> LayerShape:
        if self.dropped:
            return LayerShape(0, 0, 0)
        heads = sum(len(self.heads_by_group[g]) for g in self.groups) if self.attention else 0
        width = len(next(iter(self.expert_channels.values()))) if self.moe else len(self.channels)
        return LayerShape(heads, len(self.groups) if self.attention else 0, width if self.mlp else 0,
                          len(self.experts) if self.mlp else 0, len(self.channels) if self.mlp and self.moe else 0)


def unit_totals(structure: ModelStructure) -> dict[str, int]:
    """How many units of each kind a model has: what `limits` count fractions of."""
    shapes = structure.layers
    return {
        "channel": sum(s.dense_ffn_width for s in shapes), "head": sum(s.num_attention_heads for s in shapes),
        "kv_group": sum(s.num_key_value_heads for s in shapes), "attention": sum(s.num_attention_heads > 0 for s in shapes),
        "mlp": sum(s.intermediate_size > 0 for s in shapes), "layer": len(shapes),
        "hidden": structure.hidden_size, "expert": sum(s.num_experts for s in shapes),
        "expert_channel": sum(s.num_experts * s.intermediate_size for s in shapes),
    }


def _order(values: torch.Tensor, units: range | list[int]) -> list[int]:
    """Units sorted from least to most important (ties broken by index, so plans are deterministic)."""
    return sorted(units, key=lambda u: (float(values[u]), u))


class _Planner:
    def __init__(self, structure: ModelStructure, scores: Scores, settings: PlannerSettings, comparable: bool):
        self.structure, self.scores, self.settings = structure, scores, settings
        self._expert_channel_cache: dict[int, torch.Tensor] = {}
        self.layers: list[_LayerState] = []
        for i, shape in enumerate(structure.layers):
            per_group = shape.heads_per_group
            head_scores = self._unit_scores("head", i, shape.num_attention_heads)
            group_scores = self._unit_scores("kv_group", i, shape.num_key_value_heads)
            self.layers.append(_LayerState(
                index=i,
                groups=_order(group_scores, range(shape.num_key_value_heads)),
                heads_by_group={g: _order(head_scores, range(g * per_group, (g + 1) * per_group))
                                for g in range(shape.num_key_value_heads)},
                # a MoE layer's own channels are its shared expert's (each routed expert's are in expert_channels)
                channels=_order(self._unit_scores("channel", i, shape.dense_ffn_width), range(shape.dense_ffn_width)),
                attention=shape.num_attention_heads > 0,
                mlp=shape.intermediate_size > 0,
                experts=_order(self._unit_scores("expert", i, shape.num_experts), range(shape.num_experts)),
                moe=shape.num_experts > 0,
                expert_channels=self._expert_channel_order(i, shape),
            ))
        self._structure_at: dict[int, ModelStructure] = {}
        self.hidden = _order(self._hidden_scores(), range(structure.hidden_size))  # kept, least important first
        self.removed_units = {k: 0 for k in MOVE_KINDS}
        self.total_units = self._count_units()
        self.scale = {k: 1.0 for k in MOVE_KINDS} if comparable else self._normalizers()

    # --- scores
    def _unit_scores(self, kind: str, layer: int, size: int) -> torch.Tensor:
        if self.scores.has(kind) and len(self.scores.values[kind]) > layer and self.scores.values[kind][layer].numel() == size:
            return self.scores.values[kind][layer].double()
        return torch.zeros(size, dtype=torch.float64)

    def _expert_channel_order(self, layer: int, shape: LayerShape) -> dict[int, list[int] | range]:
        """Each routed expert's channels, least important first: ranked only when they may be pruned
        (a MoE model has millions of them); a stable sort breaks ties by index, as _order does."""
        if "expert_channel" not in self.settings.prune:
            return {e: range(shape.intermediate_size) for e in range(shape.num_experts)}
        ranked = torch.sort(self._expert_channel_scores(layer, shape), dim=1, stable=True).indices
        return dict(enumerate(ranked.tolist()))

    def _expert_channel_scores(self, layer: int, shape: LayerShape) -> torch.Tensor:
        """[experts, width] scores of the channels inside a MoE layer's routed experts (zeros if
        unscored); kept once per layer, since a MoE layer has up to millions of them."""
        cache = self._expert_channel_cache
        if layer not in cache:
            size = shape.num_experts * shape.intermediate_size
            values = self.scores.values.get("expert_channel", [])
            if len(values) > layer and values[layer].numel() == size:
                cache[layer] = values[layer].double().reshape(shape.num_experts, shape.intermediate_size)
            else:
                cache[layer] = torch.zeros(shape.num_experts, shape.intermediate_size, dtype=torch.float64)
        return cache[layer]

    def _layer_score(self, kind: str, layer: int) -> float:
        return float(self.scores.values[kind][layer]) if self.scores.has(kind) else 0.0

    def _hidden_scores(self) -> torch.Tensor:
        """One score per residual channel: the sum of every layer's share."""
        size = self.structure.hidden_size
        shares = [v.double() for v in self.scores.values.get("hidden", []) if v.numel() == size]
        return torch.stack(shares).sum(0) if shares else torch.zeros(size, dtype=torch.float64)

    def at_hidden(self, hidden: int | None = None) -> ModelStructure:
        """The structure's costs at `hidden` residual channels (default: those kept now)."""
        hidden = len(self.hidden) if hidden is None else hidden
        if hidden not in self._structure_at:
            self._structure_at[hidden] = self.structure.at_hidden_size(hidden)
        return self._structure_at[hidden]

    def _count_units(self) -> dict[str, int]:
        return unit_totals(self.structure)

    def _normalizers(self) -> dict[str, float]:
        """Criteria whose kinds are in different units (weight norms, activations) are put on one
        scale: each kind's mean damage per unit of basis becomes 1."""
        scale = {}
        for kind in MOVE_KINDS:
            damages, costs = [], []
            for state in self.layers:
                for move in self._moves_in_layer(state, kinds=(kind,), ignore_limits=True):
                    damages.append(move[1])
                    costs.append(move[2])
            for move in self._hidden_moves(ignore_limits=True) if kind == "hidden" else ():
                damages.append(move[1])
                costs.append(move[2])
            total_damage = sum(abs(d) for d in damages)
            scale[kind] = (sum(costs) / total_damage) if total_damage > 0 else 1.0
        return scale

    # --- basis
    def _layer_basis(self, i: int, shape: LayerShape, hidden: int | None = None) -> float:
        s = self.at_hidden(hidden)
        if shape == LayerShape(0, 0, 0):
            return 0.0
        basis = self.settings.basis
        if basis in ("non-embedding", "total"):
            return s.layer_costs[i].params(shape)
        if basis == "flops":
            return s.layer_flops_per_token(i, self.settings.flops_seq_len, shape)
        return 2 * shape.num_key_value_heads * s.head_dim * 2 if shape.num_attention_heads else 0.0

    def basis_total(self, shapes: list[LayerShape] | None = None, hidden: int | None = None) -> float:
        s = self.at_hidden(hidden)
        shapes = shapes or list(s.layers)
        layers = sum(self._layer_basis(i, shape, hidden) for i, shape in enumerate(shapes))
        constant = {"non-embedding": s.other_params, "total": s.other_params + s.embedding_params,
                    "flops": s.output_head_flops, "kv-cache": 0}[self.settings.basis]
        return layers + constant

    # --- moves: (kind, damage, basis bought, layer, apply)
    def _allowed(self, kind: str, count: int, ignore_limits: bool) -> bool:
        if kind not in self.settings.prune and not ignore_limits:
            return False
        limit = self.settings.limits.get(kind)
        return ignore_limits or limit is None or self.removed_units[kind] + count <= limit * self.total_units[kind] + 1e-9

    def _moves_in_layer(self, state: _LayerState, kinds=MOVE_KINDS, ignore_limits=False):
        i = state.index
        if state.dropped or i in self.settings.protect_layers:
            return
        before = state.shape()
        here = self._layer_basis(i, before)

        def bought(shape: LayerShape) -> float:
            return here - self._layer_basis(i, shape)

        m = self.settings.ffn_multiple
        if "expert" in kinds and state.mlp and len(state.experts) > 1 and self._allowed("expert", 1, ignore_limits):
            damage = float(self._unit_scores("expert", i, self.structure.layers[i].num_experts)[state.experts[0]])
            yield ("expert", damage, bought(replace(before, num_experts=before.num_experts - 1)), i, 1)
        expert_m = math.lcm(m, EXPERT_WIDTH_MULTIPLE)
        if "expert_channel" in kinds and state.mlp and state.moe and before.intermediate_size > expert_m:
            keep = (before.intermediate_size - 1) // expert_m * expert_m
            cut = before.intermediate_size - keep
            if self._allowed("expert_channel", cut * len(state.experts), ignore_limits):
                values = self._expert_channel_scores(i, self.structure.layers[i])
                damage = float(sum(values[e, list(state.expert_channels[e][:cut])].sum() for e in state.experts))
                yield ("expert_channel", damage, bought(replace(before, intermediate_size=keep)), i, cut * len(state.experts))
        if "channel" in kinds and state.mlp and len(state.channels) > m:
            keep = (len(state.channels) - 1) // m * m
            cut = state.channels[:len(state.channels) - keep]
            if self._allowed("channel", len(cut), ignore_limits):
                damage = float(self._unit_scores("channel", i, self.structure.layers[i].dense_ffn_width)[cut].sum())
                narrower = replace(before, shared_expert_size=keep) if state.moe else replace(before, intermediate_size=keep)
                yield ("channel", damage, bought(narrower), i, len(cut))
        if state.attention:
            per_group = len(state.heads_by_group[state.groups[0]])
            if "head" in kinds and per_group > 1 and self._allowed("head", len(state.groups), ignore_limits):
                heads = [state.heads_by_group[g][0] for g in state.groups]
                damage = float(self._unit_scores("head", i, self.structure.layers[i].num_attention_heads)[heads].sum())
                shape = replace(before, num_attention_heads=before.num_attention_heads - len(state.groups))
                yield ("head", damage, bought(shape), i, len(state.groups))
            if "kv_group" in kinds and len(state.groups) > 1 and self._allowed("kv_group", 1, ignore_limits):
                g = state.groups[0]
                damage = float(self._unit_scores("kv_group", i, self.structure.layers[i].num_key_value_heads)[g])
                shape = replace(before, num_attention_heads=before.num_attention_heads - per_group,
                                num_key_value_heads=before.num_key_value_heads - 1)
                yield ("kv_group", damage, bought(shape), i, 1)
            if "attention" in kinds and state.mlp and self._allowed("attention", 1, ignore_limits):
                damage = max(self._layer_score("attention", i) - state.damage["attention"], 0.0)
                yield ("attention", damage, bought(replace(before, num_attention_heads=0, num_key_value_heads=0)), i, 1)
        if "mlp" in kinds and state.mlp and state.attention and self._allowed("mlp", 1, ignore_limits):
            damage = max(self._layer_score("mlp", i) - state.damage["mlp"], 0.0)
            yield ("mlp", damage, bought(replace(before, intermediate_size=0)), i, 1)
        alive = sum(not s.dropped for s in self.layers)
        if "layer" in kinds and alive > 1 and self._allowed("layer", 1, ignore_limits):
            damage = max(self._layer_score("layer", i) - state.damage["attention"] - state.damage["mlp"], 0.0)
            yield ("layer", damage, here, i, 1)

    def _hidden_moves(self, ignore_limits: bool = False):
        """The hidden move, if one is left: the `hidden_multiple` least important residual channels."""
        m, n = self.settings.hidden_multiple, len(self.hidden)
        keep = (n - 1) // m * m
        if keep < m or not self._allowed("hidden", n - keep, ignore_limits):
            return
        damage = float(self._hidden_scores()[self.hidden[:n - keep]].sum())
        shapes = self.shapes()
        yield ("hidden", damage, self.basis_total(shapes) - self.basis_total(shapes, keep), -1, n - keep)

    def apply(self, move: tuple) -> None:
        kind, damage, _, layer, count = move
        state = self.layers[layer]
        self.removed_units[kind] += count
        if kind == "hidden":
            self.hidden = self.hidden[count:]
            return
        if kind == "channel":
            state.channels = state.channels[count:]
            state.damage["mlp"] += damage
        elif kind == "head":
            for g in state.groups:
                state.heads_by_group[g] = state.heads_by_group[g][1:]
            state.damage["attention"] += damage
        elif kind == "kv_group":
            state.groups = state.groups[1:]
            state.damage["attention"] += damage
        elif kind == "attention":
            state.attention = False
        elif kind == "expert":
            state.experts = state.experts[1:]
            state.damage["mlp"] += damage
        elif kind == "expert_channel":
            cut = count // len(state.experts)
            state.expert_channels = {e: kept[cut:] for e, kept in state.expert_channels.items()}
            state.damage["mlp"] += damage
        elif kind == "mlp":
            state.mlp = False
        elif kind == "layer":
            state.dropped = True

    def shapes(self) -> list[LayerShape]:
        return [s.shape() for s in self.layers]


# ----------------------------------------------------------------------------- allocation
def _greedy(planner: _Planner, goal: float, layers: list[int] | None = None, kinds=MOVE_KINDS,
            overshoot: bool = True) -> None:
    """Take the cheapest move (damage per basis bought) until `goal` of basis is removed.
    Without `overshoot`, stop before a move would pass the goal (a budget to fill from below)."""
    start = planner.basis_total(planner.shapes())
    scope = layers if layers is not None else range(len(planner.layers))
    while (removed := start - planner.basis_total(planner.shapes())) < goal:
        moves = [mv for i in scope for mv in planner._moves_in_layer(planner.layers[i], kinds=kinds) if mv[2] > 0]
        if layers is None and "hidden" in kinds:
            moves += [mv for mv in planner._hidden_moves() if mv[2] > 0]
        if not moves:
            return
        best = min(moves, key=lambda mv: (planner.scale[mv[0]] * mv[1] / mv[2], mv[3], mv[0]))
        if not overshoot and removed + best[2] > goal:
            return
        planner.apply(best)


def _uniform(planner: _Planner, goal: float) -> None:
    """Width moves applied to every layer at once; layer drops ranked like global moves."""
    start = planner.basis_total(planner.shapes())
    while start - planner.basis_total(planner.shapes()) < goal:
        options = []
        for kind in ("channel", "head", "kv_group", "expert", "expert_channel"):
            per_layer = [next(planner._moves_in_layer(s, kinds=(kind,)), None) for s in planner.layers
                         if not s.dropped and s.index not in planner.settings.protect_layers
                         and (s.moe if kind in ("expert", "expert_channel") else
                              not (kind == "channel" and s.moe and not planner.structure.layers[s.index].dense_ffn_width))]
            if per_layer and all(mv is not None for mv in per_layer):
                damage, gained = sum(mv[1] for mv in per_layer), sum(mv[2] for mv in per_layer)
                if gained > 0:
                    options.append((planner.scale[kind] * damage / gained, kind, per_layer))
        hidden = next(planner._hidden_moves(), None)
        if hidden and hidden[2] > 0:
            options.append((planner.scale["hidden"] * hidden[1] / hidden[2], "hidden", [hidden]))
        for state in planner.layers:
            mv = next(planner._moves_in_layer(state, kinds=("layer",)), None)
            if mv and mv[2] > 0:
                options.append((planner.scale["layer"] * mv[1] / mv[2], "layer", [mv]))
        if not options:
            return
        _, _, moves = min(options, key=lambda o: (o[0], o[1]))
        for mv in moves:
            planner.apply(mv)


def layer_importance(scores: Scores, structure: ModelStructure) -> torch.Tensor:
    """One importance per layer: the layer score where the criterion has one, else the sum of
    its unit scores."""
    if scores.has("layer"):
        return scores.layer_values("layer").double()
    totals = torch.zeros(structure.num_layers, dtype=torch.float64)
    for kind in ("channel", "head"):
        if scores.has(kind):
            totals += torch.stack([v.double().sum() for v in scores.values[kind]])
    return totals


def _rescaled(ratios: torch.Tensor, target: float, weights: torch.Tensor) -> torch.Tensor:
    """`ratios` scaled so that their `weights`-weighted mean is `target`, each in [0, 0.95]."""
    for _ in range(50):
        ratios = ratios.clamp(0, 0.95)
        mean = (ratios * weights).sum() / weights.sum()
        if abs(mean - target) < 1e-6 or mean == 0:
            break
        ratios = ratios * target / mean
    return ratios.clamp(0, 0.95)


def adaptive_budgets(importance: torch.Tensor, target: float, strength: float, weights: torch.Tensor) -> torch.Tensor:
    """Per-layer removal fractions around `target`: the least important layer loses
    target * (1 + strength), the most important target * (1 - strength) (by rank, robust to the
    huge spread of layer scores), rescaled so that the weighted mean is the target."""
    n = len(importance)
    if n == 1:
        return torch.tensor([target], dtype=torch.float64)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(importance, stable=True)] = torch.arange(n, dtype=torch.float64) / (n - 1)  # 0 = least important
    return _rescaled(target * (1 + strength * (1 - 2 * ranks)), target, weights)


def _adaptive(planner: _Planner, goal: float) -> None:
    s = planner.structure
    importance = layer_importance(planner.scores, s)
    weights = torch.tensor([planner._layer_basis(i, shape) for i, shape in enumerate(s.layers)], dtype=torch.float64)
    budgets = adaptive_budgets(importance, goal / max(float(weights.sum()), 1.0), planner.settings.adaptive_strength, weights)
    width = tuple(k for k in planner.settings.prune if k in WIDTH_KINDS)
    for i in range(s.num_layers):
        if i not in planner.settings.protect_layers:
            _greedy(planner, float(budgets[i] * weights[i]), layers=[i], kinds=width, overshoot=False)
    # Budgets are filled from below; the last bit goes to the layers with the largest budgets.
    start = planner.basis_total(list(s.layers))
    for i in sorted(range(s.num_layers), key=lambda i: (-float(budgets[i]), i)):
        remaining = goal - (start - planner.basis_total(planner.shapes()))
        if remaining <= 0:
            return
        if i not in planner.settings.protect_layers:
            _greedy(planner, remaining, layers=[i], kinds=width)
    remaining = goal - (start - planner.basis_total(planner.shapes()))
    if remaining > 0:
        _greedy(planner, remaining)


def layer_cosines(scores: Scores, structure: ModelStructure, allocation: str) -> torch.Tensor:
    """Each layer's mean cos(input, output), as the criterion's calibration pass recorded it."""
    cos = scores.meta.get("layer_cos")
    if cos is None or len(cos) != structure.num_layers:
        raise PlanError(f"allocation {allocation!r} spreads the target by each layer's cos(input, output), which the "
                        f"{scores.criterion} scores do not record; score with slimllm, adapt_pruner or a criterion "
                        f"with a calibration pass (activation, fluctuation, block_influence), or use allocation adaptive")
    return torch.tensor(cos, dtype=torch.float64)


def slimllm_alpha(target: float) -> float:
    """SlimLLM's softmax temperature: 10 at 20% removed and 7 at 50% (its published settings),
    linear between and held at the ends."""
    return float(min(10.0, max(7.0, 10.0 - 10.0 * (target - 0.2))))


def slimllm_budgets(cos: torch.Tensor, target: float, weights: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """SlimLLM's per-layer removal fractions: proportional to softmax(alpha * cos(in, out)), so a
    layer that barely turns the residual stream loses more; scaled to the target (SlimLLM sets the
    scale by hand, `--pruning_ratio`)."""
    alpha = slimllm_alpha(target) if alpha is None else alpha
    shares = torch.softmax(alpha * cos.double(), 0) * len(cos)
    return _rescaled(target * shares, target, weights)


# Adapt-Pruner's published scripts (amplitude 0.02 = the per-step increment of pruning ratio 1.0 in
# 50 steps); allocation option amplitude sets it.
ADAPT_PRUNER_AMPLITUDE = 1.0


def similarity_budgets(cos: torch.Tensor, target: float, amplitude: float, weights: torch.Tensor) -> torch.Tensor:
    """Adapt-Pruner's per-layer removal fractions: target * (1 + amplitude * n), n the layer's
    cos(in, out) minus the mean, over the largest such deviation (in [-1, 1]). Its scripts step
    each layer by the per-step increment plus amplitude * n with amplitude equal to the increment,
    which is amplitude 1 here."""
    centered = cos.double() - cos.double().mean()
    spread = centered.abs().max()
    normalized = centered / spread if spread > 0 else torch.zeros_like(centered)
    return _rescaled(target * (1 + amplitude * normalized), target, weights)


def _fill_sublayer_budgets(planner: _Planner, goal: float, ratios: torch.Tensor) -> None:
    """Each layer's attention and FFN lose its ratio of their own basis (SlimLLM and Adapt-Pruner
    prune heads and channels of a layer at one ratio), filled from below; what rounding leaves
    goes, a move at a time, to the layer furthest below its ratio, so no layer is pushed far past it."""
    s = planner.structure
    width = tuple(k for k in planner.settings.prune if k in WIDTH_KINDS)
    attention_kinds = tuple(k for k in width if k in ("head", "kv_group"))
    start = planner.basis_total(list(s.layers))
    for i, shape in enumerate(s.layers):
        if i in planner.settings.protect_layers:
            continue
        whole = planner._layer_basis(i, shape)
        without_attention = replace(shape, num_attention_heads=0, num_key_value_heads=0)
        # a MoE layer's channel moves narrow its shared expert only: its ratio is of that expert's part
        without_channels = replace(shape, shared_expert_size=0) if shape.num_experts else replace(shape, intermediate_size=0)
        parts = ((attention_kinds, whole - planner._layer_basis(i, without_attention)),
                 (("channel",) if "channel" in width else (), whole - planner._layer_basis(i, without_channels)))
        for kinds, part in parts:
            if kinds and part > 0:
                _greedy(planner, float(ratios[i]) * part, layers=[i], kinds=kinds, overshoot=False)
    weights = _layer_weights(planner)
    while start - planner.basis_total(planner.shapes()) < goal:
        options = []
        for state in planner.layers:
            moves = [mv for mv in planner._moves_in_layer(state, kinds=width) if mv[2] > 0]
            if moves and weights[state.index] > 0:
                removed = 1 - planner._layer_basis(state.index, state.shape()) / float(weights[state.index])
                cheapest = min(moves, key=lambda mv: (planner.scale[mv[0]] * mv[1] / mv[2], mv[0]))
                options.append((removed - float(ratios[state.index]), state.index, cheapest))
        if not options:
            break
        planner.apply(min(options, key=lambda o: (o[0], o[1]))[2])
    remaining = goal - (start - planner.basis_total(planner.shapes()))
    if remaining > 0:  # widths exhausted: whatever else the settings allow
        _greedy(planner, remaining)


def _layer_weights(planner: _Planner) -> torch.Tensor:
    return torch.tensor([planner._layer_basis(i, shape) for i, shape in enumerate(planner.structure.layers)],
                        dtype=torch.float64)


def check_allocation_options(allocation: str, options: dict) -> None:
    """Only the options the allocation takes, each a number of at least 0 (0 spreads the target evenly)."""
    allowed = ALLOCATION_OPTIONS.get(allocation, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"only {', '.join(allowed)}" if allowed else "no options"
        owners = [name for name, keys in ALLOCATION_OPTIONS.items() if set(unknown) <= set(keys)]
        fix = f"drop it, or use allocation {owners[0]}" if owners else "drop it"
        raise PlanError(f"allocation {allocation!r} takes {takes}, not {', '.join(unknown)}; {fix}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PlanError(f"allocation option {key} must be a number of at least 0, got {value!r}")


def _slimllm(planner: _Planner, goal: float) -> None:
    weights = _layer_weights(planner)
    cos = layer_cosines(planner.scores, planner.structure, "slimllm")
    _fill_sublayer_budgets(planner, goal, slimllm_budgets(cos, goal / max(float(weights.sum()), 1.0), weights,
                                                          alpha=planner.settings.allocation_options.get("alpha")))


def _adapt_pruner(planner: _Planner, goal: float) -> None:
    weights = _layer_weights(planner)
    cos = layer_cosines(planner.scores, planner.structure, "adapt_pruner")
    amplitude = planner.settings.allocation_options.get("amplitude", ADAPT_PRUNER_AMPLITUDE)
    ratios = similarity_budgets(cos, goal / max(float(weights.sum()), 1.0), amplitude, weights)
    _fill_sublayer_budgets(planner, goal, ratios)


# SlimGPT's published LLaMA-7B setting at 20% (min 0.0625, max 0.25): the last layer loses 4x the first's share.
LOG_INCREASE_SPREAD = 3.0


def log_increase_budgets(num_layers: int, target: float, weights: torch.Tensor,
                         spread: float = LOG_INCREASE_SPREAD) -> torch.Tensor:
    """SlimGPT's incremental per-layer removal fractions, proportional to
    1 + spread * log(1 + i) / log(L), scaled so that the `weights`-weighted mean is `target`.
    Layer-local errors are not comparable across layers (ENVIRONMENT.md: splitting the budget by
    each layer's own OBS error doubled perplexity), so the split is a fixed shape: early layers,
    whose errors every later layer inherits, lose least."""
    if num_layers == 1:
        return torch.tensor([target], dtype=torch.float64)
    depth = torch.log1p(torch.arange(num_layers, dtype=torch.float64)) / torch.log(torch.tensor(float(num_layers)))
    shape = 1 + spread * depth
    # scaled to the target before the clamp in `_rescaled`, which would otherwise flatten the shape
    return _rescaled(target * shape / shape.mean(), target, weights)


def _log_increase(planner: _Planner, goal: float) -> None:
    weights = _layer_weights(planner)
    spread = planner.settings.allocation_options.get("spread", LOG_INCREASE_SPREAD)
    ratios = log_increase_budgets(planner.structure.num_layers, goal / max(float(weights.sum()), 1.0), weights, spread)
    _fill_sublayer_budgets(planner, goal, ratios)


ALLOCATORS = {"uniform": _uniform, "global": _greedy, "adaptive": _adaptive, "slimllm": _slimllm,
              "adapt_pruner": _adapt_pruner, "log_increase": _log_increase}


# ----------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class LayerChain:
    """One layer's width moves, cheapest first by its scores. Position p keeps what is left after
    the first p moves; `removed[p]` is the basis those moves remove (`removed[0] == 0`)."""

    layer: int
    moves: tuple[tuple, ...]
    removed: tuple[float, ...]

    @property
    def length(self) -> int:
        return len(self.moves)


@dataclass(frozen=True)
class SearchSpace:
    """Every layer's chain, the basis to remove (`goal`) and the positions `global` allocation picks."""

    chains: tuple[LayerChain, ...]
    goal: float
    start: tuple[int, ...]

    def removed(self, positions) -> float:
        return sum(self.removed_per_layer(positions))

    def removed_per_layer(self, positions) -> list[float]:
        return [chain.removed[p] for chain, p in zip(self.chains, positions)]


def search_space(structure: ModelStructure, scores: Scores, settings: PlannerSettings, *,
                 comparable: bool = True) -> SearchSpace:
    """The chains the allocation search moves along. Within a layer the moves come in the order
    global allocation takes them (so the search only decides how far each layer goes), and the
    start is global allocation's plan: the search begins where the default ends."""
    settings.validate()
    check_reachable(structure, settings)
    check_shared_expert_scores(structure, scores, settings)
    kinds = tuple(k for k in settings.prune if k in WIDTH_KINDS)
    walker = _Planner(structure, scores, settings, comparable)
    chains = []
    for state in walker.layers:
        before = walker._layer_basis(state.index, state.shape())
        moves, removed = [], [0.0]
        while candidates := [mv for mv in walker._moves_in_layer(state, kinds=kinds) if mv[2] > 0]:
            move = min(candidates, key=lambda mv: (walker.scale[mv[0]] * mv[1] / mv[2], mv[0]))
            walker.apply(move)
            moves.append(move)
            removed.append(before - walker._layer_basis(state.index, state.shape()))
        chains.append(LayerChain(state.index, tuple(moves), tuple(removed)))
    default = _Planner(structure, scores, replace(settings, allocation="global"), comparable)
    goal = settings.target * default.basis_total()
    _greedy(default, goal, kinds=kinds)
    start = []
    for chain, state in zip(chains, default.layers):
        here = default._layer_basis(state.index, structure.layers[state.index]) - default._layer_basis(state.index, state.shape())
        start.append(min(range(chain.length + 1), key=lambda p: abs(chain.removed[p] - here)))
    return SearchSpace(tuple(chains), goal, tuple(start))


def plan_at(space: SearchSpace, positions, structure: ModelStructure, scores: Scores, settings: PlannerSettings, *,
            comparable: bool = True, meta: dict | None = None) -> Plan:
    """The plan that takes each layer `positions[i]` moves along its chain."""
    if len(positions) != len(space.chains) or any(not 0 <= p <= c.length for p, c in zip(positions, space.chains)):
        raise PlanError(f"positions {list(positions)} do not fit the chains (lengths {[c.length for c in space.chains]})")
    planner = _Planner(structure, scores, settings, comparable)
    for chain, position in zip(space.chains, positions):
        for move in chain.moves[:position]:
            planner.apply(move)
    total = planner.basis_total(list(structure.layers))
    plan = _to_plan(planner, structure, settings, scores, 1 - planner.basis_total(planner.shapes()) / total)
    if meta:
        plan = replace(plan, meta={**plan.meta, **meta})
    return plan


# ----------------------------------------------------------------------------- entry points
def make_plan(structure: ModelStructure, scores: Scores, settings: PlannerSettings, *, comparable: bool = True) -> Plan:
    """The plan that removes `settings.target` of the basis with the least predicted damage.

    `comparable` says whether the criterion's kinds share a unit (loss-based criteria: taylor,
    sensitivity); otherwise each kind is normalised before kinds compete.
    """
    settings.validate()
    missing = [k for k in settings.prune if not scores.has(k)]
    if missing:
        raise PlanError(
            f"the {scores.criterion} scores have no values for {missing}; score them (another criterion or "
            f"--kinds) or prune only {[k for k in settings.prune if scores.has(k)]}"
        )
    check_reachable(structure, settings)
    check_shared_expert_scores(structure, scores, settings)
    if settings.allocation == "search":
        raise PlanError("allocation 'search' measures candidate models, so it needs the model and calibration data: "
                        "run it through prunekit.prune (or `prunekit prune --allocation search`), not make_plan")
    planner = _Planner(structure, scores, settings, comparable)
    total = planner.basis_total()
    ALLOCATORS[settings.allocation](planner, settings.target * total)
    achieved = 1 - planner.basis_total(planner.shapes()) / total
    return _to_plan(planner, structure, settings, scores, achieved)


def check_shared_expert_scores(structure: ModelStructure, scores: Scores, settings: PlannerSettings) -> None:
    """Refuse to prune the shared experts of MoE layers by `channel` scores that do not rank their
    channels: unscored, they would all look free to remove and go first."""
    if "channel" not in settings.prune:
        return
    values = scores.values.get("channel", [])
    unscored = [i for i, s in enumerate(structure.layers)
                if s.num_experts and s.shared_expert_size and i not in settings.protect_layers
                and not (len(values) > i and values[i].numel() == s.shared_expert_size)]
    if unscored:
        raise PlanError(f"the {scores.criterion} scores do not rank the channels of the shared experts of MoE layers "
                        f"{unscored}; score them with magnitude, random or reap, or leave channel out of "
                        f"--prune-structures (routed experts: expert, expert_channel)")


def check_reachable(structure: ModelStructure, settings: PlannerSettings) -> None:
    """Refuse a target that the allowed structures and limits cannot reach (needs shapes only,
    so callers run it before scoring)."""
    reachable = max_removable_fraction(structure, settings)
    if settings.target > reachable + 1e-9:
        raise PlanError(
            f"target {settings.target:.3f} of {settings.basis} is out of reach for {list(settings.prune)} under the "
            f"limits {settings.limits or 'none'}: at most {reachable:.3f} can be removed; lower the target or allow "
            f"more structures (--prune-structures){_multiple_hint(structure, settings)}"
        )


def _multiple_hint(structure: ModelStructure, settings: PlannerSettings) -> str:
    """FFNs no wider than `ffn_multiple` lose no channel: say so, a small model's usual cause."""
    narrowest = min((s.dense_ffn_width for s in structure.layers if s.dense_ffn_width), default=0)
    if "channel" in settings.prune and 0 < narrowest <= settings.ffn_multiple:
        return (f", or lower --ffn-multiple ({settings.ffn_multiple}): an FFN {narrowest} wide keeps every channel "
                f"at that multiple")
    return ""


def max_removable_fraction(structure: ModelStructure, settings: PlannerSettings) -> float:
    """The most of the basis that the allowed moves and limits can remove (no scores needed)."""
    zeros = Scores("none", {k: [torch.zeros(n) for n in _unit_counts(structure, k)] for k in MOVE_KINDS})
    probe = replace(settings, target=0.5)
    planner = _Planner(structure, zeros, probe, comparable=True)
    total = planner.basis_total()
    ALLOCATORS["uniform" if settings.allocation == "uniform" else "global"](planner, total)
    return 1 - planner.basis_total(planner.shapes()) / total


def shape_only_plan(structure: ModelStructure, settings: PlannerSettings) -> Plan:
    """A plan that meets the target with every unit scored alike: the shape a scored plan will
    have, up to which units go and how the allocation spreads them. Preflights size the later
    stages (recovery, evaluation) of a run with it, before any score exists."""
    zeros = Scores("none", {k: [torch.zeros(n, dtype=torch.float64) for n in _unit_counts(structure, k)]
                            for k in MOVE_KINDS},
                   {"layer_cos": [1.0] * structure.num_layers})  # layers alike for the slimllm / adapt_pruner allocations
    if settings.allocation == "search":  # the search moves widths between layers, around the same total
        settings = replace(settings, allocation="global")
    return make_plan(structure, zeros, settings, comparable=True)


def _unit_counts(structure: ModelStructure, kind: str) -> list[int]:
    if kind == "hidden":
        return [structure.hidden_size] * structure.num_layers
    return [{"channel": s.dense_ffn_width, "head": s.num_attention_heads, "kv_group": s.num_key_value_heads,
             "expert": s.num_experts, "expert_channel": s.num_experts * s.intermediate_size}.get(kind, 1)
            for s in structure.layers]


def _to_plan(planner: _Planner, structure: ModelStructure, settings: PlannerSettings, scores: Scores, achieved: float) -> Plan:
    layers: dict[int, LayerPlan] = {}
    dropped = []
    for state, original in zip(planner.layers, structure.layers):
        if state.dropped:
            dropped.append(state.index)
            continue
        entry = {}
        if not state.attention and original.num_attention_heads:
            entry["drop_attention"] = True
        elif state.shape().num_attention_heads != original.num_attention_heads:
            entry["keep_kv_groups"] = tuple(sorted(state.groups))
            entry["keep_query_heads"] = tuple(sorted(h for g in state.groups for h in state.heads_by_group[g]))
        if not state.mlp and original.intermediate_size:
            entry["drop_mlp"] = True
        elif state.moe:
            if len(state.experts) != original.num_experts:
                entry["keep_experts"] = tuple(sorted(state.experts))
            if state.shape().intermediate_size != original.intermediate_size:
                entry["keep_expert_channels"] = tuple(tuple(sorted(state.expert_channels[e])) for e in sorted(state.experts))
            if len(state.channels) != original.shared_expert_size:
                entry["keep_shared_expert_channels"] = tuple(sorted(state.channels))
        elif len(state.channels) != original.intermediate_size:
            entry["keep_channels"] = tuple(sorted(state.channels))
        if entry:
            layers[state.index] = LayerPlan(**entry)
    return Plan(
        layers=layers,
        drop_layers=tuple(dropped),
        keep_hidden=tuple(sorted(planner.hidden)) if len(planner.hidden) < structure.hidden_size else None,
        model=structure_signature(structure),
        meta={"criterion": scores.criterion, "criterion_meta": scores.meta.get("variant") or scores.meta.get("angular"),
              "settings": settings.to_dict(), "achieved": round(achieved, 6)},
    )


def basis_value(structure: ModelStructure, basis: str, seq_len: int = 2048) -> float:
    """How much of `basis` a model has: parameters, FLOPs per token or KV-cache bytes per token."""
    value = {
        "non-embedding": lambda s: s.non_embedding_params, "total": lambda s: s.total_params,
        "flops": lambda s: s.flops_per_token(seq_len), "kv-cache": lambda s: s.kv_cache_bytes_per_token(),
    }[basis]
    return value(structure)


def removed_fraction(before: ModelStructure, after: ModelStructure, basis: str, seq_len: int = 2048) -> float:
    return 1 - basis_value(after, basis, seq_len) / basis_value(before, basis, seq_len)


__all__ = ["ALLOCATIONS", "BASES", "MOVE_KINDS", "LayerChain", "PlannerSettings", "SearchSpace", "adaptive_budgets", "log_increase_budgets",
           "layer_importance", "plan_at", "search_space",
           "basis_value", "check_reachable", "make_plan", "max_removable_fraction", "removed_fraction", "shape_only_plan"]
