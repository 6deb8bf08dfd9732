"""Perplexity of a causal LM over fixed-length windows of one token stream.

The protocol of the pruning literature: tokenize the whole text once without special tokens, cut
it into windows of seq_len tokens (the remainder is dropped), and average the NLL of every
predicted token. With `stride < seq_len` the windows overlap (the Hugging Face sliding-window
protocol): each window after the first scores only its last `stride` tokens, which then see
seq_len - stride tokens of context.

Tokenizers that add BOS by default (Gemma) get BOS at the start of every window, which then holds
seq_len - 1 text tokens and scores all of them; without BOS the first token of a window is context
only. Either way a window is seq_len model inputs with seq_len - 1 scored tokens.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.models.loading import TORCH_DTYPES as DTYPES
from prunekit.models.loss import OutputHead, token_nll
from prunekit.data import (
    TEXT_PROTOCOLS,
    DataError,
    TextProtocol,
    adds_bos_by_default,
    encode_text,
    join_documents,
    load_texts,
    resolve_split,
)



@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and every setting that produced it (`protocol`), so that numbers stay comparable."""

    perplexity: float
    mean_nll: float  # nats per scored token
    n_tokens: int  # tokens scored
    n_windows: int
    protocol: dict[str, Any]


@dataclass(frozen=True)
class Window:
    start: int  # position of the window's first text token in the stream
    first_scored: int  # position, within the model input, of the first token whose NLL counts


def plan_windows(
    n_stream_tokens: int,
    *,
    seq_len: int,
    bos: bool,
    stride: int | None = None,
    window_every: int = 1,
    max_windows: int | None = None,
) -> list[Window]:
    """The windows that score a stream: non-overlapping (stride None) or sliding, full windows only."""
    text_len = seq_len - bos
    last_start = n_stream_tokens - text_len
    # Input 0 (BOS, or the first text token) is context only, so scoring starts at input 1.
    if stride is None:
        windows = [Window(start, 1) for start in range(0, last_start + 1, text_len)[::window_every]]
    else:
        windows = [
            Window(start, 1 if start == 0 else seq_len - stride) for start in range(0, last_start + 1, stride)
        ]
    return windows[:max_windows]


def perplexity(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    dataset: str | torch.Tensor = "wikitext2",
    split: str | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    window_every: int = 1,
    protocol: TextProtocol = "raw",
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    data_dir: str | os.PathLike | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on a text source or on a 1-D tensor of token ids.

    dataset: any text-source spec of `prunekit.data.load_texts` (its documents are joined with
        blank lines), or a pre-tokenized LongTensor (then `tokenizer` only decides BOS; it may be None).
    split: the named set's split; None takes its default (test for wikitext2).
    protocol: `raw` (wiki.test.raw as it is) or `joined` (the literature's WikiText-2 lines joined
        with "\\n\\n"); see `prunekit.data.sources.wikitext_text`.
    stride: None for non-overlapping windows; else the sliding-window step, below seq_len.
    window_every: keep every k-th non-overlapping window, for quick estimates.
    dtype: None evaluates in the weights' dtype; bfloat16/float16 on float32 weights run under
        autocast, leaving the model untouched.
    max_windows: score only the first this many windows (after window_every).
    """
    _check_arguments(seq_len, stride, window_every, batch_size, max_windows, protocol)
    if tokenizer is None and not isinstance(dataset, torch.Tensor):
        raise ValueError(f"dataset {dataset!r} is text, so perplexity needs a tokenizer; pass one.")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}; lower seq_len."
        )
    weights_dtype = next(model.parameters()).dtype
    compute_dtype = _compute_dtype(dtype, weights_dtype)
    bos = tokenizer is not None and adds_bos_by_default(tokenizer)

    if isinstance(dataset, torch.Tensor):
        stream = _stream_from_tensor(dataset)
        source, split, text_protocol = "token tensor", None, None
    else:
        split = resolve_split(dataset, split)
        texts = load_texts(dataset, split=split, data_dir=data_dir, text_protocol=protocol)
        stream = torch.tensor(encode_text(tokenizer, join_documents(texts)), dtype=torch.long)
        source, text_protocol = dataset, protocol

    windows = plan_windows(
        len(stream), seq_len=seq_len, bos=bos, stride=stride, window_every=window_every, max_windows=max_windows
    )
    if not windows:
        raise DataError(
            f"{source} has {len(stream)} tokens, fewer than one window of {seq_len - bos}; "
            "lower seq_len or use a larger source."
        )
    nll_sum, n_scored = _score_windows(
        model,
        stream,
        windows,
        seq_len=seq_len,
        bos_id=tokenizer.bos_token_id if bos else None,
        batch_size=batch_size,
        autocast_dtype=compute_dtype if compute_dtype != weights_dtype else None,
        progress=progress,
    )
    mean_nll = nll_sum / n_scored
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        n_tokens=n_scored,
        n_windows=len(windows),
        protocol={
            "dataset": source,
            "split": split,
            "text_protocol": text_protocol,
            "seq_len": seq_len,
            "stride": stride,
            "window_every": window_every,
            "max_windows": max_windows,
            "dtype": str(compute_dtype).removeprefix("torch."),
            "autocast": compute_dtype != weights_dtype,
            "bos": bos,
            "tokenizer": _tokenizer_name(tokenizer),
            "stream_tokens": len(stream),
        },
    )


def _check_arguments(
    seq_len: int,
    stride: int | None,
    window_every: int,
    batch_size: int,
    max_windows: int | None,
    protocol: str,
) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict anything, got {seq_len}; raise seq_len.")
    if stride is not None and not 1 <= stride < seq_len:
        raise ValueError(
            f"stride must lie in [1, seq_len) = [1, {seq_len}), got {stride}; "
            "leave stride=None for non-overlapping windows."
        )
    if window_every < 1:
        raise ValueError(f"window_every must be at least 1, got {window_every}; use 1 to keep every window.")
    if stride is not None and window_every != 1:
        raise ValueError(
            "window_every thins non-overlapping windows and would leave gaps in a sliding window; "
            "use either stride or window_every."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}; pass a positive batch_size.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}; leave it None to score every window.")
    if protocol not in TEXT_PROTOCOLS:
        raise ValueError(f"unknown text protocol {protocol!r}; choose one of {', '.join(TEXT_PROTOCOLS)}.")


def _compute_dtype(dtype: torch.dtype | str | None, weights_dtype: torch.dtype) -> torch.dtype:
    if dtype is None:
        return weights_dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    lower_precision = (torch.bfloat16, torch.float16)
    if dtype != weights_dtype and not (weights_dtype == torch.float32 and dtype in lower_precision):
        raise ValueError(
            f"cannot evaluate {weights_dtype} weights in {dtype}: autocast only lowers float32; "
            f"load the model in {dtype}, or leave dtype=None."
        )
    return dtype


def _stream_from_tensor(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"token tensor has dtype {tokens.dtype}; pass integer token ids (torch.long).")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(
            f"token tensor has shape {tuple(tokens.shape)}; pass one stream of ids, shape [n] or [1, n]."
        )
    return tokens.long().cpu()


def _tokenizer_name(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _score_windows(
    model: torch.nn.Module,
    stream: torch.Tensor,
    windows: list[Window],
    *,
    seq_len: int,
    bos_id: int | None,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> tuple[float, int]:
    """(sum of the scored tokens' NLL, number of scored tokens)."""
    device = next(model.parameters()).device
    text_len = seq_len - (bos_id is not None)
    # The model runs to its final hidden states only; the loss makes the logits a chunk of
    # positions at a time, in float32 (prunekit.models.loss), so a large vocabulary needs no
    # smaller batches.
    head = OutputHead.of(model)
    windows_per_forward = batch_size
    precision = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_scored = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision:
            for first in tqdm(
                range(0, len(windows), windows_per_forward),
                desc="perplexity",
                unit="batch",
                disable=not progress,
            ):
                batch = windows[first : first + windows_per_forward]
                inputs = torch.stack([stream[window.start : window.start + text_len] for window in batch])
                if bos_id is not None:
                    inputs = torch.cat([inputs.new_full((len(batch), 1), bos_id), inputs], dim=1)
                inputs = inputs.to(device)
                hidden = model.base_model(inputs, use_cache=False).last_hidden_state
                # Hidden states at position t predict the token at t + 1.
                scored_hidden = torch.cat([hidden[row, window.first_scored - 1 : -1] for row, window in enumerate(batch)])
                targets = torch.cat([inputs[row, window.first_scored :] for row, window in enumerate(batch)])
                nll_sum += token_nll(head, scored_hidden, targets).sum(dtype=torch.float64)
                n_scored += len(targets)
    finally:
        model.train(was_training)
    return nll_sum.item(), n_scored
