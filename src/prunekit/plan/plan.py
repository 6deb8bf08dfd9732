"""A plan: what to keep of a model, as plain JSON. Deciding (criteria, planners) ends here;
surgery executes a plan and never sees a score.

    {
      "format": "prunekit.plan/1",
      "model": {...},                  # optional: the structure the plan was made for
      "drop_layers": [12, 13],         # whole decoder layers, by index in the source model
      "keep_hidden": [0, 1, 3, ...],   # residual-stream channels kept, one set for the whole model
      "layers": {                      # per source layer; a layer not listed is kept whole
        "3": {"keep_kv_groups": [0, 2]},              # whole GQA groups, with their query heads
        "4": {"keep_query_heads": [0, 1, 3, 4, 6, 7]}, # the same number from every group
        "5": {"keep_channels": [0, 5, 9, ...]},        # FFN channels (rows of gate/up)
        "6": {"drop_attention": true},
        "7": {"drop_mlp": true},
        "8": {"keep_experts": [0, 2, 3, 5]},          # routed experts of a MoE layer (router rows too)
        "9": {"keep_expert_channels": [[0, 4], [1, 4], ...]}, # FFN channels of each kept routed expert
        "10": {"keep_shared_expert_channels": [0, 3, ...]}    # FFN channels of a MoE layer's shared expert
      },
      "meta": {...}                    # free-form: who made it, criterion, target
    }

Query head h belongs to KV group h // (heads per group). Given only `keep_kv_groups`, every
query head of the kept groups stays; given only `keep_query_heads`, the groups that still have
a head stay. Every kept group must keep the same number of query heads (that is what GQA
attention computes with), and emptying a sublayer must be said with `drop_attention` /
`drop_mlp`, so that a typo cannot silently remove a whole sublayer.

`keep_experts` keeps routed experts of a mixture-of-experts layer: their weights and their
router rows stay, the rest go, and top-k becomes at most the experts left. Removing an expert is
the same as masking its router logit to -inf. Keeping none is refused (say `drop_mlp`).
`keep_expert_channels` keeps FFN channels inside the routed experts: one list per kept expert (in
the order of their source indices), every list as long as the others, since a MoE layer's experts
share one width. Each expert keeps its own channels (rows of its gate/up, columns of its down).
`keep_channels` is refused on a MoE layer. A pruned expert width is a multiple of 8: transformers'
default experts kernel (grouped GEMM) needs each expert's rows to span a multiple of 16 bytes, which
8 bfloat16 values do. `keep_shared_expert_channels` keeps FFN channels of a MoE layer's shared
expert (Qwen2-MoE: a dense MLP that every token runs, scaled by a sigmoid gate): rows of its
gate/up, columns of its down, any number but none (say `drop_mlp`, which removes the whole block).

`keep_hidden` prunes the model's hidden size: the embedding columns, the output head's input
columns, every norm over the residual stream, the input columns of q/k/v/gate/up and the output
rows of o/down. head_dim and the KV cache do not change. Absent means every channel stays; an
empty list is refused (it would remove the whole residual stream).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.models.structure import LayerShape, ModelStructure

PLAN_FORMAT = "prunekit.plan/1"
# What a pruned expert width must be a multiple of: transformers' grouped-GEMM experts kernel (its
# default for fused MoE experts) refuses weight strides that are not a multiple of 16 bytes.
EXPERT_WIDTH_MULTIPLE = 8
_KEEP_KEYS = ("keep_query_heads", "keep_kv_groups", "keep_channels", "keep_experts", "keep_expert_channels",
              "keep_shared_expert_channels")
_LAYER_KEYS = _KEEP_KEYS + ("drop_attention", "drop_mlp")
_PLAN_KEYS = ("format", "model", "drop_layers", "keep_hidden", "layers", "meta")


class PlanError(PrunekitError, ValueError):
    """The plan cannot be applied to this model; raised before any weight is touched."""


@dataclass(frozen=True)
class LayerPlan:
    keep_query_heads: tuple[int, ...] | None = None
    keep_kv_groups: tuple[int, ...] | None = None
    keep_channels: tuple[int, ...] | None = None
    drop_attention: bool = False
    drop_mlp: bool = False
    keep_experts: tuple[int, ...] | None = None
    keep_expert_channels: tuple[tuple[int, ...], ...] | None = None   # per kept routed expert
    keep_shared_expert_channels: tuple[int, ...] | None = None        # of a MoE layer's shared expert

    def to_dict(self) -> dict:
        out: dict = {}
        for key in _KEEP_KEYS:
            if getattr(self, key) is not None:
                out[key] = [list(v) for v in getattr(self, key)] if key == "keep_expert_channels" else list(getattr(self, key))
        for key in ("drop_attention", "drop_mlp"):
            if getattr(self, key):
                out[key] = True
        return out


@dataclass(frozen=True)
class Plan:
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    drop_layers: tuple[int, ...] = ()
    model: dict | None = None
    meta: dict = field(default_factory=dict)
    keep_hidden: tuple[int, ...] | None = None

    def is_empty(self) -> bool:
        """Removes nothing by its own account (a keep_hidden listing every channel still needs the
        model's hidden size to tell; surgery checks that)."""
        return not self.drop_layers and not any(lp.to_dict() for lp in self.layers.values()) and self.keep_hidden is None

    def to_dict(self) -> dict:
        out: dict = {"format": PLAN_FORMAT}
        if self.model is not None:
            out["model"] = self.model
        out["drop_layers"] = sorted(self.drop_layers)
        if self.keep_hidden is not None:
            out["keep_hidden"] = sorted(self.keep_hidden)
        out["layers"] = {str(i): lp.to_dict() for i, lp in sorted(self.layers.items()) if lp.to_dict()}
        if self.meta:
            out["meta"] = self.meta
        return out

    def save(self, path: str | Path) -> None:
        from prunekit.export.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(_PLAN_KEYS)
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; a plan has {list(_PLAN_KEYS)}")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"plan format {data['format']!r} is not {PLAN_FORMAT!r}; this prunekit cannot read it")
        layers = {}
        for key, entry in (data.get("layers") or {}).items():
            index = _int(key, "a layer key")
            if not isinstance(entry, dict):
                raise PlanError(f"layer {key}: expected an object with keys {list(_LAYER_KEYS)}, got {entry!r}")
            unknown = set(entry) - set(_LAYER_KEYS)
            if unknown:
                raise PlanError(f"layer {key}: unknown keys {sorted(unknown)}; a layer entry has {list(_LAYER_KEYS)}")
            layers[index] = LayerPlan(
                **{k: _int_lists(entry[k], f"layer {key} {k}") if k == "keep_expert_channels" else
                   _int_list(entry[k], f"layer {key} {k}") for k in _KEEP_KEYS if entry.get(k) is not None},
                **{k: _bool(entry[k], f"layer {key} {k}") for k in _LAYER_KEYS[len(_KEEP_KEYS):] if k in entry},
            )
        return cls(
            layers=layers,
            drop_layers=_int_list(data.get("drop_layers") or [], "drop_layers"),
            keep_hidden=_int_list(data["keep_hidden"], "keep_hidden") if data.get("keep_hidden") is not None else None,
            model=data.get("model"),
            meta=data.get("meta") or {},
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; write one (see the README's plan format) or make one with `prunekit plan`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PlanError(f"plan file {path} is not valid JSON ({error}); fix or regenerate it") from None
        return cls.from_dict(data)


def _int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise PlanError(f"{what} must be an integer, got {value!r}") from None


def _int_list(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"{what} must be a list of integers, got {values!r}")
    return tuple(_int(v, what) for v in values)


def _int_lists(values, what: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"{what} must be a list of lists of integers (one per kept expert), got {values!r}")
    return tuple(_int_list(v, what) for v in values)


def _bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"{what} must be true or false, got {value!r}")
    return value


def structure_signature(structure: ModelStructure) -> dict:
    """What a plan records about the model it was made for."""
    return {
        "model_type": structure.model_type,
        "hidden_size": structure.hidden_size,
        "head_dim": structure.head_dim,
        "vocab_size": structure.vocab_size,
        # MoE layers add their expert count, and then their shared expert's width if they have one
        "layers": [[s.num_attention_heads, s.num_key_value_heads, s.intermediate_size]
                   + ([s.num_experts] if s.num_experts else []) + ([s.shared_expert_size] if s.shared_expert_size else [])
                   for s in structure.layers],
    }


@dataclass(frozen=True)
class KeptLayer:
    """What survives of one source layer: sorted indices; empty lists mean the sublayer is gone."""

    source_index: int
    query_heads: tuple[int, ...]
    kv_groups: tuple[int, ...]
    channels: tuple[int, ...]
    experts: tuple[int, ...] = ()   # kept routed experts of a MoE layer (`channels` then spans one expert's width)
    # the channels each kept expert keeps, in the order of `experts`; () when every expert keeps all of its own
    expert_channels: tuple[tuple[int, ...], ...] = ()
    shared_channels: tuple[int, ...] = ()  # kept channels of a MoE layer's shared expert (all of them if unpruned)

    @property
    def shape(self) -> LayerShape:
        width = len(self.expert_channels[0]) if self.expert_channels else len(self.channels)
        return LayerShape(len(self.query_heads), len(self.kv_groups), width, len(self.experts), len(self.shared_channels))


def _check_indices(indices: tuple[int, ...], size: int, what: str) -> tuple[int, ...]:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise PlanError(f"{what} {bad} out of range: this model has {size} (indices 0..{size - 1})")
    if len(set(indices)) != len(indices):
        raise PlanError(f"{what} lists an index twice: {sorted(indices)}")
    return tuple(sorted(indices))


def _kept_attention(index: int, shape: LayerShape, lp: LayerPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if lp.drop_attention or shape.num_attention_heads == 0:
        if shape.num_attention_heads == 0 and (lp.keep_query_heads or lp.keep_kv_groups):
            raise PlanError(f"layer {index} has no attention left, yet the plan keeps heads of it")
        return (), ()
    per_group = shape.heads_per_group
    heads = _check_indices(lp.keep_query_heads, shape.num_attention_heads, f"layer {index} keep_query_heads") \
        if lp.keep_query_heads is not None else None
    groups = _check_indices(lp.keep_kv_groups, shape.num_key_value_heads, f"layer {index} keep_kv_groups") \
        if lp.keep_kv_groups is not None else None
    if heads is None and groups is None:
        return tuple(range(shape.num_attention_heads)), tuple(range(shape.num_key_value_heads))
    if heads is None:
        heads = tuple(h for g in groups for h in range(g * per_group, (g + 1) * per_group))
    if groups is None:
        groups = tuple(sorted({h // per_group for h in heads}))
    if not heads or not groups:
        raise PlanError(
            f"layer {index}: the plan keeps no query heads, which removes the whole attention; "
            f"say so with \"drop_attention\": true"
        )
    orphans = [h for h in heads if h // per_group not in groups]
    if orphans:
        raise PlanError(f"layer {index}: query heads {orphans} belong to KV groups the plan removes; keep their group or drop them")
    counts = {g: sum(1 for h in heads if h // per_group == g) for g in groups}
    if len(set(counts.values())) != 1:
        raise PlanError(
            f"layer {index}: kept query heads per KV group are {counts}; GQA needs the same number in every "
            f"kept group (and none kept in a group means removing the group)"
        )
    return heads, groups


def kept_hidden(plan: Plan, structure: ModelStructure) -> tuple[int, ...]:
    """The residual-stream channels `plan` keeps, sorted (all of them when it names none)."""
    if plan.keep_hidden is None:
        return tuple(range(structure.hidden_size))
    channels = _check_indices(plan.keep_hidden, structure.hidden_size, "keep_hidden")
    if not channels:
        raise PlanError(
            "keep_hidden is empty, which removes the whole residual stream; list the channels to keep, "
            "or leave keep_hidden out to keep them all"
        )
    return channels


def resolve_plan(plan: Plan, structure: ModelStructure) -> list[KeptLayer]:
    """Check `plan` against the model and spell out what every surviving layer keeps
    (`kept_hidden` spells out the residual channels; both check the whole plan)."""
    if plan.model is not None:
        _check_made_for(plan.model, structure)
    kept_hidden(plan, structure)
    n = structure.num_layers
    dropped = set(_check_indices(plan.drop_layers, n, "drop_layers"))
    for index in plan.layers:
        if not 0 <= index < n:
            raise PlanError(f"the plan has an entry for layer {index}, but this model has {n} layers (0..{n - 1})")
        if index in dropped:
            raise PlanError(f"layer {index} is in drop_layers and also has a layer entry; remove one of the two")
    if len(dropped) == n:
        raise PlanError("the plan drops every layer; keep at least one")
    kept = []
    for index, shape in enumerate(structure.layers):
        if index in dropped:
            continue
        lp = plan.layers.get(index, LayerPlan())
        heads, groups = _kept_attention(index, shape, lp)
        if lp.drop_mlp or shape.intermediate_size == 0:
            if shape.intermediate_size == 0 and lp.keep_channels:
                raise PlanError(f"layer {index} has no MLP left, yet the plan keeps channels of it")
            channels: tuple[int, ...] = ()
        elif lp.keep_channels is None:
            channels = tuple(range(shape.intermediate_size))
        else:
            channels = _check_indices(lp.keep_channels, shape.intermediate_size, f"layer {index} keep_channels")
            if not channels:
                raise PlanError(
                    f"layer {index}: the plan keeps no FFN channels, which removes the whole MLP; "
                    f"say so with \"drop_mlp\": true"
                )
        experts = _kept_experts(index, shape, lp, channels)
        kept.append(KeptLayer(index, heads, groups, channels, experts, _kept_expert_channels(index, shape, lp, experts),
                              _kept_shared_channels(index, shape, lp, experts)))
    return kept


def _kept_shared_channels(index: int, shape: LayerShape, lp: LayerPlan, experts: tuple[int, ...]) -> tuple[int, ...]:
    """The kept channels of a MoE layer's shared expert: all of them unless the plan names some."""
    if lp.keep_shared_expert_channels is None:
        return tuple(range(shape.shared_expert_size)) if experts else ()
    if not shape.shared_expert_size:
        fix = ("keep_channels prunes a dense MLP" if shape.intermediate_size and not shape.num_experts else
               "its experts are pruned with keep_experts / keep_expert_channels" if shape.num_experts else "its MLP is gone")
        raise PlanError(f"layer {index} has no shared expert, yet the plan keeps channels of it; remove its "
                        f"keep_shared_expert_channels ({fix})")
    if not experts:
        raise PlanError(f"layer {index} has no MLP left, yet the plan keeps channels of its shared expert")
    channels = _check_indices(lp.keep_shared_expert_channels, shape.shared_expert_size,
                              f"layer {index} keep_shared_expert_channels")
    if not channels:
        raise PlanError(f"layer {index}: the plan keeps no channels of its shared expert; a MoE block cannot run without "
                        f"it, so keep some, or remove the whole block with \"drop_mlp\": true")
    return channels


def _kept_expert_channels(index: int, shape: LayerShape, lp: LayerPlan,
                          experts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Each kept expert's kept channels (() when none are pruned); one width for all of them."""
    if lp.keep_expert_channels is None:
        return ()
    if not shape.num_experts:
        raise PlanError(f"layer {index} is not a mixture-of-experts layer, yet the plan keeps channels of its experts; "
                        f"remove its keep_expert_channels (keep_channels prunes a dense MLP)")
    if not experts:
        raise PlanError(f"layer {index} has no MLP left, yet the plan keeps channels of its experts")
    if len(lp.keep_expert_channels) != len(experts):
        raise PlanError(f"layer {index} keep_expert_channels lists {len(lp.keep_expert_channels)} experts, but the layer "
                        f"keeps {len(experts)}; give one list per kept expert, in the order of their indices")
    lists = tuple(_check_indices(c, shape.intermediate_size, f"layer {index} keep_expert_channels")
                  for c in lp.keep_expert_channels)
    widths = sorted({len(c) for c in lists})
    if len(widths) > 1:
        raise PlanError(f"layer {index} keep_expert_channels keeps {widths} channels in different experts; the experts of "
                        f"a layer share one width, so keep the same number in every expert")
    if widths == [0]:
        raise PlanError(f"layer {index}: the plan keeps no channels of its experts, which removes the whole MLP; "
                        f"say so with \"drop_mlp\": true")
    if widths == [shape.intermediate_size]:
        return ()
    if widths[0] % EXPERT_WIDTH_MULTIPLE:
        raise PlanError(f"layer {index} keep_expert_channels keeps {widths[0]} channels per expert; keep a multiple of "
                        f"{EXPERT_WIDTH_MULTIPLE}, since transformers' grouped expert kernel needs each expert's rows to "
                        f"span a multiple of 16 bytes")
    return lists


def _kept_experts(index: int, shape: LayerShape, lp: LayerPlan, channels: tuple[int, ...]) -> tuple[int, ...]:
    if not shape.num_experts:
        if lp.keep_experts is not None:
            raise PlanError(f"layer {index} is not a mixture-of-experts layer, yet the plan keeps experts of it; "
                            f"remove its keep_experts")
        return ()
    if not channels:
        if lp.keep_experts:
            raise PlanError(f"layer {index} has no MLP left, yet the plan keeps experts of it")
        return ()
    if lp.keep_channels is not None and len(channels) != shape.intermediate_size:
        raise PlanError(f"layer {index} is a mixture-of-experts layer, whose channels belong to each expert; replace its "
                        f"keep_channels with keep_expert_channels (one list per kept expert)")
    if lp.keep_experts is None:
        return tuple(range(shape.num_experts))
    experts = _check_indices(lp.keep_experts, shape.num_experts, f"layer {index} keep_experts")
    if not experts:
        raise PlanError(f"layer {index}: the plan keeps no experts, which removes the whole MLP; "
                        f"say so with \"drop_mlp\": true")
    return experts


def _check_made_for(expected: dict, structure: ModelStructure) -> None:
    actual = structure_signature(structure)
    differences = [
        f"{key} {expected.get(key)!r} vs {actual[key]!r}"
        for key in ("model_type", "hidden_size", "head_dim", "vocab_size")
        if key in expected and expected[key] != actual[key]
    ]
    exp, act = expected.get("layers"), actual["layers"]
    if exp is not None and (len(exp) != len(act) or not all(map(_same_layer, exp, act))):
        if len(exp) != len(act):
            differences.append(f"{len(exp)} layers vs {len(act)}")
        else:
            first = next(i for i, (a, b) in enumerate(zip(exp, act)) if not _same_layer(a, b))
            differences.append(f"layer {first} [heads, kv heads, ffn] {exp[first]} vs {act[first]}")
    if differences:
        raise PlanError(
            "this plan was made for another model (plan vs model: " + "; ".join(differences) +
            "); make a new plan for this model"
        )


def _same_layer(expected: list, actual: list) -> bool:
    """One layer's widths agree; a plan made before signatures listed the shared expert's width
    (a MoE layer of four numbers) still matches its model."""
    return list(expected) == actual or (len(expected) == 4 and len(actual) == 5 and list(expected) == actual[:4])


def predicted_structure(plan: Plan, structure: ModelStructure) -> ModelStructure:
    """The structure the model will have after `plan`: parameter counts known before surgery."""
    kept = resolve_plan(plan, structure)
    layer_types = tuple(structure.layer_types[k.source_index] for k in kept) if structure.layer_types else None
    return replace(
        structure,
        layers=tuple(k.shape for k in kept),
        layer_costs=tuple(structure.layer_costs[k.source_index] for k in kept),
        layer_types=layer_types,
    ).at_hidden_size(len(kept_hidden(plan, structure)))


def surviving_layers(plans: list[dict], num_layers: int) -> list[int]:
    """The source index of every layer that the plans, applied in order, leave: a later plan's
    drop_layers count the layers the one before it left."""
    survivors = list(range(num_layers))
    for plan in plans:
        dropped = set(plan.get("drop_layers") or ())
        survivors = [source for index, source in enumerate(survivors) if index not in dropped]
    return survivors
