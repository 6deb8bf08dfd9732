"""Scores: how important each prunable component is (higher = keep), per kind and per layer.

Kinds: `layer`, `attention`, `mlp` (one value per layer), `kv_group`, `head`, `channel` (one
value per unit). A criterion fills the kinds it can measure; the planner uses what is there.
Ragged lists, so that already-pruned models with uneven layers are scored the same way.
`hidden` scores the residual stream's channels: per layer, that layer's share (one value per
channel); the planner ranks channels by the sum over layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

KINDS = ("layer", "attention", "mlp", "kv_group", "head", "channel")
LAYER_KINDS = ("layer", "attention", "mlp")   # one value per layer
UNIT_KINDS = ("kv_group", "head", "channel")  # one value per unit of a layer
HIDDEN_KIND = "hidden"                        # one value per residual channel, from every layer
ALL_KINDS = KINDS + (HIDDEN_KIND,)
EXPERT_KIND = "expert"                        # one value per routed expert of a MoE layer (none on dense layers)
# one value per channel of every routed expert of a MoE layer: [experts, width] (none on dense layers)
EXPERT_CHANNEL_KIND = "expert_channel"
SCORE_KINDS = ALL_KINDS + (EXPERT_KIND, EXPERT_CHANNEL_KIND)  # every kind a Scores may hold; only MoE criteria score experts


def first_non_finite(values: dict[str, list[torch.Tensor]]) -> tuple[str, int] | None:
    """(kind, layer) of the first NaN or inf score, or None."""
    for kind, per_layer in values.items():
        for layer, tensor in enumerate(per_layer):
            if not torch.isfinite(tensor).all():
                return kind, layer
    return None


class ScoreError(PrunekitError, ValueError):
    """Scores that cannot be planned with (NaN or inf), found before any planning."""


@dataclass
class Scores:
    criterion: str
    values: dict[str, list[torch.Tensor]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.values) - set(SCORE_KINDS)
        if unknown:
            raise ValueError(f"unknown score kinds {sorted(unknown)}; kinds are {list(SCORE_KINDS)}")
        bad = first_non_finite(self.values)
        if bad is not None:
            kind, layer = bad
            raise ScoreError(
                f"criterion {self.criterion!r} gave NaN or inf scores (first in layer {layer}, {kind}), so nothing can be "
                f"ranked; "
                f"the model's activations overflowed (load it in float32 or bfloat16 with --dtype, not float16) or its "
                f"weights are broken (re-download the checkpoint)"
            )

    def has(self, kind: str) -> bool:
        return kind in self.values

    def layer_values(self, kind: str) -> torch.Tensor:
        """One value per layer for `layer`, `attention` or `mlp`."""
        return torch.stack([v.reshape(()) for v in self.values[kind]])

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "meta": self.meta,
            "values": {kind: [v.tolist() for v in per_layer] for kind, per_layer in self.values.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scores:
        values = {kind: [torch.tensor(v, dtype=torch.float64) for v in per_layer] for kind, per_layer in data["values"].items()}
        return cls(data["criterion"], values, data.get("meta", {}))

    def save(self, path: str | Path) -> None:
        from prunekit.export.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Scores from a scores.json; NaN or inf in it (JSON allows both) is refused before planning."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        found = first_non_finite({kind: [torch.tensor(v, dtype=torch.float64) for v in per_layer]
                                  for kind, per_layer in data.get("values", {}).items()})
        if found is not None:
            raise ScoreError(f"{path} holds NaN or inf scores (first in layer {found[1]}, {found[0]}), which cannot be ranked; "
                             f"score the model again (prunekit analyze) in float32 or bfloat16")
        return cls.from_dict(data)
