"""Block reconstruction: once the structure is fixed and compensated, train every kept weight of
each pruned decoder layer (q/k/v/o, gate/up/down, norms) so that it reproduces what the DENSE
layer outputs on the same input, the input being the pruned model's own (Wanda++'s regional
optimisation, run sequentially as SparseGPT does its refit).

Least squares reaches only the output projections and only linearly; here the whole block moves,
by Adam on the mean squared error of its output, one layer at a time:

    for layer l:  X' = the pruned model's states entering l (already reconstructed up to l)
                  Y  = dense_l(X')                     (target, computed once)
                  minimise ||pruned_l(X') − Y||² over the pruned layer's parameters

A held-apart share of the calibration rows measures the same error every `eval_every` steps; the
layer keeps the weights of its best measurement (so it never ends worse than it started) and stops
after `patience` measurements without improvement. Rows are drawn by a generator seeded with
`seed`: the same inputs give the same weights. The device holds one pruned layer, one dense layer,
the states and their targets; the dense copies wait in CPU memory.

With `checkpoint_dir`, each trained layer is written there (its weights, its result and the
generator's state), so that a run killed midway and started again on the same pruned model and
settings loads the layers already trained instead of training them again.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.compensate.bias import CompensationError
from prunekit.models.architecture import architecture_for
from prunekit.models.layerwise import embed_calibration, first_output, layer_on, run_layer
from prunekit.models.modeling_prunekit import decoder_layers

DEFAULT_LR = 1e-4
DEFAULT_HELD_OUT = 0.125   # of the calibration rows; at least one row
DEFAULT_EVAL_EVERY = 25
DEFAULT_PATIENCE = 4


@dataclass(frozen=True)
class LayerReconstruction:
    """One layer's training. Errors are ||pruned(X') − dense(X')||² / ||dense(X') − X'||² on the
    held-apart rows: relative to what the dense block adds to the residual stream."""

    layer: int                 # index in the pruned model
    source_layer: int          # index in the dense model
    steps: int                 # steps run (early stopping may end before the budget)
    best_step: int             # the step whose weights were kept (0: the weights as they came)
    error_before: float
    error_after: float


@dataclass(frozen=True)
class ReconstructionReport:
    layers: tuple[LayerReconstruction, ...]
    steps: int
    lr: float
    held_out_rows: int
    seed: int

    def to_dict(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "held_out_rows": self.held_out_rows, "seed": self.seed,
                "layers": [asdict(layer) for layer in self.layers]}


def dense_layer_copies(model: nn.Module) -> list[nn.Module]:
    """Frozen copies of `model`'s decoder layers in CPU memory, taken before pruning: the targets
    that `reconstruct_blocks` fits to."""
    arch = architecture_for(model.config.model_type)
    copies = []
    for layer in decoder_layers(model, arch.to_dict()):
        dense = copy.deepcopy(layer).to("cpu").eval()
        dense.requires_grad_(False)
        copies.append(dense)
    return copies


def check_reconstruction(steps: int, lr: float, held_out: float = DEFAULT_HELD_OUT) -> None:
    if steps < 0:
        raise CompensationError(f"reconstruction steps must be 0 or more, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise CompensationError(f"the reconstruction learning rate must be a positive number, got {lr}; "
                                f"the default is {DEFAULT_LR}")
    if not 0 < held_out < 1:
        raise CompensationError(f"the held-out share of calibration rows must lie between 0 and 1, got {held_out}")


def reconstruct_blocks(model: nn.Module, dense_layers: list[nn.Module], input_ids: torch.Tensor, *, steps: int,
                       lr: float = DEFAULT_LR, sources: list[int] | None = None, batch_size: int = 8,
                       held_out: float = DEFAULT_HELD_OUT, eval_every: int = DEFAULT_EVAL_EVERY,
                       patience: int = DEFAULT_PATIENCE, seed: int = 0, progress: bool = True,
                       device: torch.device | str | None = None,
                       checkpoint_dir: Path | None = None) -> ReconstructionReport:
    """Train each decoder layer of the pruned `model`, in place, toward `dense_layers[sources[l]]`
    on the pruned model's own states; `sources` maps pruned layers to dense ones (default: one to
    one). With `steps=0` nothing changes. Returns what each layer gained on the held-apart rows.
    With `checkpoint_dir`, trained layers are saved there and loaded again by a rerun (module doc)."""
    check_reconstruction(steps, lr, held_out)
    arch = architecture_for(model.config.model_type)
    layers = decoder_layers(model, arch.to_dict())
    if sources is None and len(layers) != len(dense_layers):
        sources = []  # layers were dropped: the caller must say which survived
    sources = list(range(len(layers))) if sources is None else list(sources)
    if len(sources) != len(layers) or max(sources, default=0) >= len(dense_layers):
        raise CompensationError(f"the pruned model has {len(layers)} layers, mapped to dense layers {sources} of "
                                f"{len(dense_layers)}; pass the surviving layers' source indices")
    if steps == 0:
        return ReconstructionReport((), 0, lr, 0, seed)
    if len(input_ids) < 2:
        raise CompensationError("block reconstruction needs at least 2 calibration rows (one to train on, one held "
                                "apart); raise --calib-samples")
    device = device if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(input_ids), generator=generator)
    n_held = min(len(input_ids) - 1, max(1, round(held_out * len(input_ids))))
    held_rows, train_rows = order[:n_held].sort().values, order[n_held:]
    key = _checkpoint_key(layers, input_ids, sources, steps, lr, held_out, eval_every, patience, seed)
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        stream, kwargs_of = embed_calibration(model, layers, input_ids, batch_size=batch_size, device=device)
    results = []
    bar = tqdm(range(len(layers)), desc="reconstruction: layers", unit="layer", disable=not progress)
    for index in bar:
        layer, dense = layers[index], dense_layers[sources[index]]
        saved = _load_checkpoint(checkpoint_dir, index, key)
        with layer_on(layer, device), layer_on(dense, device):
            if saved is not None:  # trained before a kill: the same weights, the same generator state after
                with torch.no_grad():
                    layer.load_state_dict(saved["state"])
                generator.set_state(saved["generator"])
                result = tuple(saved["result"])
            else:
                target = _outputs(dense, stream, kwargs_of[index], batch_size)
                result = _train_layer(layer, stream, target, kwargs_of[index], train_rows, held_rows, steps=steps,
                                      lr=lr, batch_size=batch_size, eval_every=eval_every, patience=patience,
                                      generator=generator)
                del target
                _save_checkpoint(checkpoint_dir, index, key, layer, result, generator)
            with torch.no_grad():
                run_layer(layer, stream, kwargs_of[index], batch_size=batch_size)
        results.append(LayerReconstruction(index, sources[index], *result))
        bar.set_postfix(error=f"{result[2]:.3g}->{result[3]:.3g}")
    return ReconstructionReport(tuple(results), steps, lr, n_held, seed)


def _checkpoint_key(layers: nn.ModuleList, input_ids: torch.Tensor, sources: list[int], *settings) -> str:
    """What a checkpoint must match: the settings, the rows, and the pruned layers as they came
    (shapes and a sum of every tensor: a rerun of the same prune reproduces them)."""
    digest = hashlib.sha256(repr((sources, settings)).encode())
    digest.update(input_ids.cpu().numpy().tobytes())
    with torch.no_grad():
        for name, tensor in layers.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{float(tensor.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def _checkpoint_file(checkpoint_dir: Path, index: int) -> Path:
    return Path(checkpoint_dir) / f"layer-{index:04d}.pt"


def _load_checkpoint(checkpoint_dir: Path | None, index: int, key: str) -> dict | None:
    if checkpoint_dir is None or not _checkpoint_file(checkpoint_dir, index).is_file():
        return None
    try:
        saved = torch.load(_checkpoint_file(checkpoint_dir, index), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None  # half written when the run was killed: train the layer again
    return saved if saved.get("key") == key else None


def _save_checkpoint(checkpoint_dir: Path | None, index: int, key: str, layer: nn.Module, result: tuple,
                     generator: torch.Generator) -> None:
    if checkpoint_dir is None:
        return
    path = _checkpoint_file(checkpoint_dir, index)
    partial = path.with_name(path.name + ".partial")
    state = {name: tensor.detach().cpu() for name, tensor in layer.state_dict().items()}
    torch.save({"key": key, "state": state, "result": list(result), "generator": generator.get_state()}, partial)
    os.replace(partial, path)


@torch.no_grad()
def _outputs(layer: nn.Module, stream: torch.Tensor, layer_kwargs: dict, batch_size: int) -> torch.Tensor:
    out = torch.empty_like(stream)
    for start in range(0, len(stream), batch_size):
        out[start:start + batch_size] = first_output(layer(stream[start:start + batch_size], **layer_kwargs))
    return out


def _error(layer: nn.Module, stream: torch.Tensor, target: torch.Tensor, layer_kwargs: dict, rows: torch.Tensor,
           batch_size: int) -> float:
    """||layer(X) − Y||² / ||Y − X||² over `rows`."""
    error = contribution = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            block = rows[start:start + batch_size].to(stream.device)
            x, y = stream[block], target[block]
            error += float((first_output(layer(x, **layer_kwargs)) - y).double().square().sum())
            contribution += float((y - x).double().square().sum())
    return error / contribution if contribution > 0 else error


def _train_layer(layer: nn.Module, stream: torch.Tensor, target: torch.Tensor, layer_kwargs: dict,
                 train_rows: torch.Tensor, held_rows: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 eval_every: int, patience: int, generator: torch.Generator) -> tuple[int, int, float, float]:
    """Adam on the layer's parameters; keeps the best held-out weights. (steps run, best step,
    error before, error after)."""
    parameters = [p for p in layer.parameters() if p.is_floating_point()]
    before = best = _error(layer, stream, target, layer_kwargs, held_rows, batch_size)
    if not parameters:
        return 0, 0, before, before
    flags = [p.requires_grad for p in parameters]
    best_state = [p.detach().clone() for p in parameters]
    best_step, step, misses = 0, 0, 0
    optimizer = torch.optim.Adam(parameters, lr=lr)
    try:
        for p in parameters:
            p.requires_grad_(True)
        while step < steps and misses < patience:
            step += 1
            rows = train_rows[torch.randint(len(train_rows), (min(batch_size, len(train_rows)),), generator=generator)]
            rows = rows.to(stream.device)
            with torch.enable_grad():
                output = first_output(layer(stream[rows], **layer_kwargs))
                loss = torch.nn.functional.mse_loss(output, target[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps:
                error = _error(layer, stream, target, layer_kwargs, held_rows, batch_size)
                if error < best:
                    best, best_step, misses = error, step, 0
                    with torch.no_grad():
                        for saved, p in zip(best_state, parameters):
                            saved.copy_(p)
                else:
                    misses += 1
    finally:
        with torch.no_grad():
            for saved, p, flag in zip(best_state, parameters, flags):
                p.copy_(saved)
                p.requires_grad_(flag)
                p.grad = None
    return step, best_step, before, best
