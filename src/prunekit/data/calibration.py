"""Token batches for calibration and recovery.

- `calibration_tokens`: [n_samples, seq_len] windows of a text source (the SparseGPT / Wanda
  recipe), or of text the model samples itself (`"self"`).
- `task_tokens`: prompt/response pairs as input_ids plus labels that put the loss on the
  response only.

Text is tokenized without special tokens. Tokenizers that add BOS by default (Gemma) get BOS as the
first token of every window, since such models score far worse without it; the window then holds
seq_len - 1 text tokens.
"""
from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from prunekit.data.sources import (
    SELF_SOURCE,
    DataError,
    PromptResponse,
    TextProtocol,
    join_documents,
    load_texts,
)
from prunekit.models.loading import cast_copy
from prunekit.models.memory import available_bytes, sampling_bytes_per_row
from prunekit.models.structure import ModelStructure, model_structure

IGNORE_INDEX = -100  # the label value torch's cross-entropy and transformers' losses skip
# Openings for self-sampled text: short and topic-free so the samples spread over what the model knows.
GENERIC_PROMPTS = ("The", "In", "A", "It", "This", "When", "One", "There", "We", "I", "After", "For")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens, however long the text (no truncation, no warning)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def adds_bos_by_default(tokenizer) -> bool:
    """Whether the tokenizer starts every encoding with BOS (Gemma does; Llama 3 and SmolLM2 do not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}; pass a value of at least 1.")


# --------------------------------------------------------------------------- text windows


# Rows sampled together when the model writes its own calibration text: decoding on a CPU is
# bound by reading the weights once per step, so 32 rows cost little more than 8 and yield 4x the
# text; on a GPU more rows per step still help a little (4,096 write 1.19x the tokens/s of 1,024:
# GPU_BENCHMARKS.md), so it takes as many as SELF_TEXT_GPU_BYTES hold, up to SELF_TEXT_BATCH_GPU.
# A fixed budget, not the free memory of the moment: the rows per step shape the text, which must
# come out the same in every process of a launch and after a resume.
SELF_TEXT_BATCH = 32
SELF_TEXT_BATCH_GPU = 4096
SELF_TEXT_GPU_BYTES = 32 * 2**30
# On a GPU the text is written by a bf16 copy: tensor-core products and half the KV cache to move.
SELF_TEXT_DTYPE_GPU = torch.bfloat16


def gpu_sampling_dtype(model: torch.nn.Module, free_bytes: int) -> torch.dtype | None:
    """SELF_TEXT_DTYPE_GPU where the GPU has room for that copy of the model beside it (with a
    warning, None otherwise: the model samples as it is, more slowly)."""
    weights = list(model.parameters())
    if weights[0].dtype == SELF_TEXT_DTYPE_GPU:
        return None
    needed = sum(w.numel() for w in weights) * SELF_TEXT_DTYPE_GPU.itemsize
    if needed > free_bytes:
        warnings.warn(f"writing the text with the model as it is, not a {SELF_TEXT_DTYPE_GPU} copy, which would need "
                      f"{needed / 2**30:.1f} GiB and the GPU has {free_bytes / 2**30:.1f} GiB free; it takes about "
                      "twice as long", stacklevel=3)
        return None
    return SELF_TEXT_DTYPE_GPU


def gpu_sampling_rows(structure: ModelStructure, seq_len: int, element_size: int, free_bytes: int) -> int:
    """Rows written at once on a GPU: as many as SELF_TEXT_GPU_BYTES hold, at most
    SELF_TEXT_BATCH_GPU; fewer, with a warning, where the GPU has less free."""
    per_row = sampling_bytes_per_row(structure, seq_len, element_size)
    rows = max(1, min(SELF_TEXT_BATCH_GPU, SELF_TEXT_GPU_BYTES // per_row))
    if rows * per_row > free_bytes:
        fewer = max(1, free_bytes // per_row)
        warnings.warn(f"writing the text {fewer} rows at a time instead of {rows}: the GPU has {free_bytes / 2**30:.1f} "
                      f"GiB free and {rows} rows need {rows * per_row / 2**30:.1f} GiB; the text differs from that of "
                      "a GPU with more room, so free it to reproduce a run", stacklevel=3)
        rows = fewer
    return rows


def calibration_tokens(
    spec: str,
    tokenizer,
    *,
    n_samples: int,
    seq_len: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    text_protocol: TextProtocol = "raw",
    model: torch.nn.Module | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """[n_samples, seq_len] token ids from a text source, the same for the same seed.

    The SparseGPT / Wanda recipe: visit the documents in a random order and take one random
    window of seq_len tokens from each document that is long enough. When fewer than n_samples
    documents are long enough (short web documents, or one running text such as wikitext2), the
    documents are joined into one stream and n_samples distinct non-overlapping windows are drawn
    from it at random, so that no two samples share tokens.

    `spec` is any text source (see `prunekit.data.sources`), or "self" for text sampled from
    `model` itself (`sample_self_tokens`, batched by `batch_size`).
    """
    _require_positive(n_samples=n_samples, seq_len=seq_len)
    if spec == SELF_SOURCE:
        if model is None:
            raise DataError(f"calibration source '{SELF_SOURCE}' samples text from the model; pass model=.")
        return sample_self_tokens(
            model, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, batch_size=batch_size
        )
    bos = adds_bos_by_default(tokenizer)
    window = seq_len - bos
    if window < 1:
        raise DataError(f"seq_len={seq_len} leaves no room for text after BOS; pass seq_len of at least 2.")

    texts = load_texts(spec, split=split, data_dir=data_dir, text_protocol=text_protocol)
    generator = torch.Generator().manual_seed(seed)
    windows = _windows_from_documents(texts, tokenizer, n_samples=n_samples, window=window, generator=generator)
    if windows is None:
        windows = _windows_from_stream(
            texts, tokenizer, n_samples=n_samples, window=window, generator=generator, spec=spec
        )
    if bos:
        windows = torch.cat([windows.new_full((n_samples, 1), tokenizer.bos_token_id), windows], dim=1)
    return windows


def _windows_from_documents(
    texts: Sequence[str], tokenizer, *, n_samples: int, window: int, generator: torch.Generator
) -> torch.Tensor | None:
    """One random window from each of n_samples random documents, or None when too few are long enough."""
    windows = []
    # Documents are tokenized one by one as they are drawn: the hub's C4 shard holds 356k of them.
    for index in torch.randperm(len(texts), generator=generator).tolist():
        ids = encode_text(tokenizer, texts[index])
        if len(ids) < window:
            continue
        start = int(torch.randint(len(ids) - window + 1, (1,), generator=generator))
        windows.append(ids[start : start + window])
        if len(windows) == n_samples:
            return torch.tensor(windows, dtype=torch.long)
    return None


def _windows_from_stream(
    texts: Sequence[str], tokenizer, *, n_samples: int, window: int, generator: torch.Generator, spec: str
) -> torch.Tensor:
    """n_samples distinct windows from the grid of non-overlapping windows over the joined documents."""
    stream = torch.tensor(encode_text(tokenizer, join_documents(texts)), dtype=torch.long)
    n_tokens = len(stream)
    if n_tokens < window:
        raise DataError(
            f"{spec} has {n_tokens} tokens, fewer than one window of {window}; "
            "lower seq_len or use a larger source."
        )
    n_slots = n_tokens // window
    if n_slots < n_samples:
        raise DataError(
            f"{spec} has {n_tokens} tokens, enough for {n_slots} windows of {window} but n_samples={n_samples} "
            "were requested; lower n_samples or seq_len, or use a larger source."
        )
    # A random shift of the whole grid, so the tokens left over are not always the stream's tail.
    offset = int(torch.randint(n_tokens - n_slots * window + 1, (1,), generator=generator))
    starts = offset + window * torch.randperm(n_slots, generator=generator)[:n_samples]
    return stream[starts[:, None] + torch.arange(window)]


# --------------------------------------------------------------------------- self-sampled text


def sample_self_tokens(
    model: torch.nn.Module,
    tokenizer,
    *,
    n_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """[n_samples, seq_len] token ids sampled from the model itself (data-free calibration, as in LLM-QAT).

    Each batch opens with one of `GENERIC_PROMPTS` (after BOS for tokenizers that add it) and is
    sampled with a KV cache to exactly seq_len tokens; EOS does not stop a sample, since
    calibration needs full windows. The result depends only on the seed, batch_size, dtype and
    the model: sampling draws from a private generator, never from torch's global one.
    batch_size None: SELF_TEXT_BATCH rows at a time on a CPU, gpu_sampling_rows on a GPU.
    dtype: sample from a copy of the model in this dtype (the model itself is untouched); None:
    gpu_sampling_dtype on a GPU (a bf16 copy where it fits), the model as it is on a CPU.
    """
    _require_positive(n_samples=n_samples, seq_len=seq_len, **({} if batch_size is None else {"batch_size": batch_size}))
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use 1.0 to sample the model as it is.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}; use 1.0 to keep the whole distribution.")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.bfloat16, got {dtype}; or None.")
    weights = next(model.parameters())
    device = weights.device
    if dtype is None and device.type == "cuda":
        dtype = gpu_sampling_dtype(model, available_bytes(str(device)))
    sampler = cast_copy(model, dtype) if dtype not in (None, weights.dtype) else model
    if batch_size is None:
        batch_size = SELF_TEXT_BATCH
        if device.type == "cuda":  # after the copy, which takes its share of the free memory
            batch_size = gpu_sampling_rows(model_structure(sampler), seq_len, next(sampler.parameters()).element_size(),
                                           available_bytes(str(device)))
    generator = torch.Generator(device=device).manual_seed(seed)
    bos = [tokenizer.bos_token_id] if adds_bos_by_default(tokenizer) else []
    cache_keyword = _cache_keyword(sampler)

    samples = []
    was_training = sampler.training
    sampler.eval()
    bar = tqdm(total=n_samples * seq_len, unit="tok", desc="sampling calibration text", disable=not progress)
    try:
        with torch.inference_mode():
            for first in range(0, n_samples, batch_size):
                rows = min(batch_size, n_samples - first)
                choice = int(torch.randint(len(GENERIC_PROMPTS), (1,), generator=generator, device=device))
                prompt = (bos + encode_text(tokenizer, GENERIC_PROMPTS[choice]))[:seq_len]
                ids = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
                bar.update(rows * len(prompt))
                output = sampler(ids, use_cache=True)
                while ids.shape[1] < seq_len:
                    next_ids = _sample_next_token(output.logits[:, -1], temperature, top_p, generator)
                    ids = torch.cat([ids, next_ids[:, None]], dim=1)
                    bar.update(rows)
                    if ids.shape[1] < seq_len:
                        output = sampler(next_ids[:, None], use_cache=True, **{cache_keyword: output[cache_keyword]})
                samples.append(ids.cpu())
    finally:
        bar.close()
        sampler.train(was_training)
    return torch.cat(samples)


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache` in forward() and in the outputs.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the tokens ranked above it already hold top_p of the mass; the top token stays.
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- prompt/response pairs


def task_tokens(
    pairs: Sequence[PromptResponse], tokenizer, *, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both [n_pairs, seq_len], with the loss on the response only.

    Each row is [BOS] + prompt + response + EOS, cut at seq_len and right-padded; labels are
    IGNORE_INDEX on the prompt and the padding. Prompt and response are tokenized separately so the
    boundary between them is exact. No attention mask is needed: under causal attention the real
    tokens never see the padding that follows them, and the padding is never scored. Pairs whose
    prompt fills the whole window are dropped with a warning.
    """
    _require_positive(seq_len=seq_len)
    if not pairs:
        raise DataError("task_tokens got no prompt/response pairs; pass at least one.")
    bos = [tokenizer.bos_token_id] if adds_bos_by_default(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    input_rows, label_rows = [], []
    for pair in pairs:
        prompt = bos + encode_text(tokenizer, pair.prompt)
        ids = (prompt + encode_text(tokenizer, pair.response) + eos)[:seq_len]
        if len(ids) <= len(prompt):
            continue
        padding = seq_len - len(ids)
        input_rows.append(ids + [pad_id] * padding)
        label_rows.append([IGNORE_INDEX] * len(prompt) + ids[len(prompt) :] + [IGNORE_INDEX] * padding)
    if not input_rows:
        raise DataError(
            f"every prompt fills seq_len={seq_len} tokens and leaves no response to learn from; raise seq_len."
        )
    if len(input_rows) < len(pairs):
        warnings.warn(
            f"{len(pairs) - len(input_rows)} of {len(pairs)} pairs dropped: their prompt fills "
            f"seq_len={seq_len} tokens; raise seq_len to keep them.",
            stacklevel=2,
        )
    return torch.tensor(input_rows, dtype=torch.long), torch.tensor(label_rows, dtype=torch.long)
