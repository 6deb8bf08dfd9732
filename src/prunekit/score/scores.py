"""Scores: how important each prunable component is (higher = keep), per kind and per layer.

Kinds: `layer`, `attention`, `mlp` (one value per layer), `kv_group`, `head`, `channel` (one
value per unit). A criterion fills the kinds it can measure; the planner uses what is there.
Ragged lists, so that already-pruned models with uneven layers are scored the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("layer", "attention", "mlp", "kv_group", "head", "channel")
LAYER_KINDS = ("layer", "attention", "mlp")   # one value per layer
UNIT_KINDS = ("kv_group", "head", "channel")  # one value per unit of a layer


@dataclass
class Scores:
    criterion: str
    values: dict[str, list[torch.Tensor]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.values) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown score kinds {sorted(unknown)}; kinds are {list(KINDS)}")
        for kind, per_layer in self.values.items():
            for tensor in per_layer:
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"{self.criterion} produced NaN or inf scores for {kind}; the model or the calibration "
                        f"data has non-finite values (check the weights, or calibrate in float32)"
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
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
