"""Memory estimates, made from a model's shapes before its weights are read, so that a job that
cannot fit is refused at once, with the options that would make it fit.

The estimates are deliberately rough and on the low side (weights, gradients, optimizer state,
the largest activations of one batch); a job is refused only when even that exceeds what the
device has free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.models.loss import chunk_positions, loss_working_bytes
from prunekit.models.structure import ModelStructure

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class InsufficientMemoryError(PrunekitError, ValueError):
    """The job clearly cannot fit in the memory of its device."""


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]            # what -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {_gib(size)}" for name, size in self.parts.items() if size)


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def available_bytes(device: str = "cpu") -> int | None:
    """Free memory of the device: MemAvailable on Linux for the CPU; for "cuda:N" that GPU's
    free memory ("cuda": the current GPU's)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _logits_bytes(structure: ModelStructure, rows: int, seq_len: int) -> int:
    return rows * seq_len * structure.vocab_size * 4 * 2  # fp32 logits and their log-softmax


def _gram_bytes(structure: ModelStructure, index: int) -> int:
    """float64 Gram matrices of one layer's o_proj and down_proj inputs."""
    shape = structure.layers[index]
    return 8 * ((shape.num_attention_heads * structure.head_dim) ** 2 + shape.intermediate_size ** 2)


# Elements per token and decoder layer that a backward pass keeps, per unit of each width, in the
# activations' dtype: fitted to the peak RSS of Taylor scoring under bf16 autocast on SmolLM2-135M
# (hidden 576, q+k+v 960, FFN 1536: 20.7k measured) and on a Gemma-3-270M-shaped model (640,
# 1536, 2048: 30.9k) with benchmarks/profile_prune.py (BENCHMARKS.md), not derived; the
# attention's inputs and outputs (q, k, v, rotary, attention output) dominate the hidden-sized ones.
SAVED_PER_HIDDEN = 2
# On the CPU the peak is the process's resident set: the interpreter with torch, transformers and
# prunekit imported holds 0.27 GiB before any tensor (torch 2.13, transformers 5.2x, measured), and
# the sequential pass of compensation peaked at twice the states, inputs and batch it keeps (SmolLM2-
# 135M, OBS at 20%: 0.94 GiB above the loaded model against 0.47 counted; the allocator keeps what
# the per-layer solves and batches free). Both measured with benchmarks/default_prune.py, not derived.
RUNTIME_CPU_BYTES = int(0.27 * 2**30)
SEQUENTIAL_CPU_OVERHEAD = 2.0
SAVED_PER_ATTENTION_WIDTH = 11  # per unit of q + k + v width
SAVED_PER_FFN = 6


def _activation_bytes(dtype: str, device: str, autocast: bool) -> int:
    """The dtype the layers compute in: bf16 under autocast where it is used (models/precision.py)."""
    from prunekit.models.precision import fast_bfloat16

    lowered = autocast and dtype == "float32" and fast_bfloat16(device)
    return 2 if lowered else BYTES[dtype]


def pruning_estimate(structure: ModelStructure, dtype: str, *, gradients: bool, batch_size: int,
                     seq_len: int, with_gram: bool = False, n_samples: int = 0, cached_layers: int = 0,
                     device: str = "cpu", autocast: bool = True, sequential: bool | None = None) -> MemoryEstimate:
    """The weights, plus the largest of the stages that run one after another: scoring one batch
    (with `gradients`, Taylor: the layers' gradients, what their backward pass keeps, and the
    chunked loss, prunekit.models.loss), the calibration states of `n_samples` rows kept at
    `cached_layers` layers (sensitivity; sequential compensation, which with `sequential` also keeps
    the MLP inputs of every row for one layer: None reads it from `cached_layers`), the Gram
    matrices of every layer for one-shot compensation (`with_gram`), and the copy that saving casts."""
    size = BYTES[dtype]
    weights = structure.total_params * size
    tokens = batch_size * seq_len
    ffn = max((s.intermediate_size for s in structure.layers), default=0)
    act = _activation_bytes(dtype, device, autocast)
    sequential = cached_layers > 0 if sequential is None else sequential
    loss = loss_working_bytes(structure.vocab_size, structure.hidden_size, tokens, dtype_bytes=size,
                              gradients=gradients, device=device)
    if gradients:
        # gradients of the decoder layers in their dtype; under autocast, the bf16 copies of their
        # weights that the backward pass keeps
        layer_weights = structure.non_embedding_params * (size + (2 if act < size else 0))
        qkv = max(((s.num_attention_heads + 2 * s.num_key_value_heads) * structure.head_dim for s in structure.layers),
                  default=0)
        kept = tokens * structure.num_layers * act * (SAVED_PER_HIDDEN * structure.hidden_size
                                                      + SAVED_PER_ATTENTION_WIDTH * qkv + SAVED_PER_FFN * ffn)
        scoring = layer_weights + kept + loss
    else:
        scoring = tokens * (6 * structure.hidden_size + 3 * ffn) * 4 + loss
    states = n_samples * seq_len * structure.hidden_size * size * cached_layers
    from prunekit.compensate.sequential import MLP_INPUTS_MAX_STREAMS

    keeps = sequential and ffn * act <= MLP_INPUTS_MAX_STREAMS * structure.hidden_size * size
    mlp_inputs = n_samples * seq_len * ffn * act if keeps else 0
    one_batch = tokens * (6 * structure.hidden_size + 3 * ffn) * 4
    compensation = states + mlp_inputs + one_batch if cached_layers else 0
    if device == "cpu":
        compensation = int(compensation * SEQUENTIAL_CPU_OVERHEAD)
    grams = sum(_gram_bytes(structure, i) for i in range(structure.num_layers)) if with_gram else 0
    saving = structure.total_params * 2  # a bf16 copy for the writing (GGUF sources declare bf16)
    stages = {"scoring one batch (gradients, saved activations, chunked loss)" if gradients
              else "scoring one batch": scoring,
              "calibration states kept for every row": compensation, "Gram matrices": grams, "the copy saved": saving}
    largest = max(stages, key=stages.get)
    runtime = {"the process itself (Python, torch, transformers)": RUNTIME_CPU_BYTES} if device == "cpu" else {}
    return MemoryEstimate({**runtime, "weights": weights, largest: stages[largest]})


def layer_by_layer_estimate(structure: ModelStructure, dtype: str, *, n_samples: int, seq_len: int, batch_size: int,
                            compensation: str) -> MemoryEstimate:
    """Device memory of layer-by-layer mode: the calibration states of every row, one layer's
    weights and one batch through it, and one layer's statistics or compensation fit. Not the
    model: it stays in CPU memory (`weights_estimate` is what the CPU needs)."""
    size = BYTES[dtype]
    widest = max(range(structure.num_layers), key=lambda i: structure.layer_params(i))
    shape = structure.layers[widest]
    ffn = max(s.intermediate_size for s in structure.layers)
    in_features = max(max(s.intermediate_size, s.num_attention_heads * structure.head_dim) for s in structure.layers)
    fit = {
        "none": 0,
        # this layer's Gram matrices, on the device while its pass runs
        "one-shot": _gram_bytes(structure, widest),
        # the widest projection's Gram matrix, its kept block, the solve and float64 copies of the weight
        "sequential": 8 * (3 * in_features ** 2 + 2 * in_features * structure.hidden_size),
        # OBS: the same plus the inverse of the damped Gram matrix, down-dated as units go
        "obs": 8 * (4 * in_features ** 2 + 2 * in_features * structure.hidden_size),
    }[compensation]
    batch = batch_size * seq_len * (6 * structure.hidden_size + 3 * max(ffn, shape.intermediate_size)) * size
    # sequential compensation keeps the MLP's inputs of every row while its pass advances the
    # stream, where they are small enough (compensate/sequential.py's MLP_INPUTS_MAX_STREAMS)
    from prunekit.compensate.sequential import MLP_INPUTS_MAX_STREAMS

    mlp_inputs = n_samples * seq_len * ffn * size
    keeps = compensation == "sequential" and ffn <= MLP_INPUTS_MAX_STREAMS * structure.hidden_size
    return MemoryEstimate({
        "calibration states": n_samples * seq_len * structure.hidden_size * size,
        "one layer": structure.layer_params(widest) * size,
        # a fit runs between the layer's batches, not beside them
        "one batch through it, or one layer's fit": max(batch, fit),
        "MLP inputs kept for the refit": mlp_inputs if keeps else 0,
    })


def weights_estimate(structure: ModelStructure, dtype: str) -> MemoryEstimate:
    return MemoryEstimate({"weights": structure.total_params * BYTES[dtype]})


# Float32 buffers of one chunk's logits that distillation holds beyond the cross-entropy's four
# (loss_working_bytes, itself above the 2.5 measured): the teacher's logits, log-softmax and
# probabilities live one after another. Measured, not derived: one distillation step of a 262,144-
# token vocabulary peaked 0.9 chunk above the same step's cross-entropy (tests/test_memory_estimate.py,
# benchmarks/recovery_loss_memory.py).
DISTILLATION_CHUNK_BUFFERS = 1


def recovery_estimate(student: ModelStructure, teacher: ModelStructure | None, dtype: str, *, lora: bool,
                      batch_size: int, seq_len: int, shards: int = 1,
                      activation_checkpointing: bool = False, device: str = "cpu") -> MemoryEstimate:
    """Per process: student weights, gradients and AdamW state (full training) or LoRA's (a few
    percent), each split `shards` ways when sharded, the whole teacher's weights, the activations
    of one micro-batch (with activation checkpointing: every layer's input and one layer's
    internals), and the chunked loss (prunekit.models.loss): one chunk's logits of the student and,
    distilling, of the teacher, the hidden states' gradient, float32 copies of the heads on a CPU
    for other dtypes, and, when the head trains, its gradient summed over the chunks until the
    backward pass takes it."""
    trained = 0.02 * student.total_params if lora else student.total_params
    layer_input = batch_size * seq_len * student.hidden_size * 4
    one_layer = 12 * layer_input  # what a layer's backward pass needs kept
    activations = layer_input * student.num_layers + one_layer if activation_checkpointing \
        else one_layer * student.num_layers
    size, positions = BYTES[dtype], batch_size * seq_len
    loss = loss_working_bytes(student.vocab_size, student.hidden_size, positions, dtype_bytes=size, gradients=True,
                              device=device)
    head = student.vocab_size * student.hidden_size * 4
    if not lora:
        loss += head  # the head's gradient, summed over the chunks in the forward pass
    if teacher is not None:
        loss += DISTILLATION_CHUNK_BUFFERS * min(positions, chunk_positions(teacher.vocab_size, device)) \
            * teacher.vocab_size * 4
        loss += teacher.vocab_size * teacher.hidden_size * 4 if device == "cpu" and size != 4 else 0
    return MemoryEstimate({
        "student weights": student.total_params * size // shards,
        "gradients and AdamW state": int(trained * 4 * 3) // shards,
        "teacher weights": teacher.total_params * size if teacher is not None else 0,
        "the loss, a chunk of positions at a time": loss,
        "activations of one batch": activations,
    })


def sampling_bytes_per_row(structure: ModelStructure, seq_len: int, element_size: int) -> int:
    """GPU memory one row of self-text sampling holds at full length: its KV cache; while a layer
    runs, that layer's cache once more as it grows by concatenation and again for every query head
    that shares a KV head (attention expands grouped keys and values); and four fp32 copies of the
    next-token distribution (logits, softmax, the draw's noise and quotient)."""
    attention = [layer for layer in structure.layers if layer.num_attention_heads]
    cache = [2 * layer.num_key_value_heads * structure.head_dim * seq_len * element_size for layer in attention]
    in_flight = max((size * (1 + layer.heads_per_group) for size, layer in zip(cache, attention)), default=0)
    return sum(cache) + in_flight + 4 * structure.vocab_size * 4


def check_fits(what: str, estimate: MemoryEstimate, device: str = "cpu", *, hints: str) -> None:
    """Refuse `what` when its estimate exceeds the device's free memory; `hints` says what lowers it."""
    free = available_bytes(device)
    if free is not None and estimate.total > free:
        raise InsufficientMemoryError(
            f"{what} needs at least {_gib(estimate.total)} ({estimate.describe()}), but the {device} has "
            f"{_gib(free)} free; {hints}")


def inference_estimate(structure: ModelStructure, dtype: str, *, batch_size: int, seq_len: int,
                       models: int = 1) -> MemoryEstimate:
    """Evaluation or timing without gradients: `models` sets of weights, and the logits and the
    activations of one batch of the widest of them."""
    size = BYTES.get(dtype, 4)
    return MemoryEstimate({
        "weights": models * structure.total_params * size,
        "logits of one batch": _logits_bytes(structure, batch_size, seq_len),
        "activations of one batch": batch_size * seq_len * structure.hidden_size * 4 * 4,
    })


class PeakMemory:
    """The peak memory of a block of work on one device, measured, to set beside its estimate.

    On a GPU: torch's peak allocation on that device. On the CPU: the process's peak resident set
    (VmHWM), which Linux lets a process reset (clear_refs 5), so it is the block's own peak; where
    that is not possible it is the peak since the process started (`since_start` says so).
    """

    def __init__(self, device: str | None):
        self.device = device or "cpu"
        self.bytes: int | None = None
        self.since_start = False

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        else:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                    handle.write("5")
            except OSError:
                self.since_start = True
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            self.bytes = torch.cuda.max_memory_allocated(torch.device(self.device))
            return
        self.bytes = _peak_resident_bytes()

    def to_dict(self, estimate: int | None) -> dict:
        return {"device": self.device, "peak_bytes": self.bytes, "estimate_bytes": estimate,
                "peak_since_process_start": self.since_start}


def describe_peak(memory: dict | None) -> str | None:
    """'peak 6.5 GiB on cpu (admitted on an estimate of 8.8 GiB)' from a PeakMemory record."""
    if not memory or not memory.get("peak_bytes"):
        return None
    estimate = (f" (admitted on an estimate of {memory['estimate_bytes'] / 2**30:.1f} GiB)"
                if memory.get("estimate_bytes") else "")
    return f"peak {memory['peak_bytes'] / 2**30:.1f} GiB on {memory['device']}{estimate}"


def _proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_resident_bytes() -> int | None:
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
