"""Training rows for recovery: [n, seq_len] token ids and labels, packed, with held-out rows apart.

- text (a named set, a .txt / .jsonl[:field] file, or "self": text sampled from the teacher):
  windows of the text, as for calibration; the loss is on every token;
- prompt/response pairs ("alpaca" in the Alpaca template, or a .jsonl with prompt and response):
  examples are concatenated, each ending with EOS, and cut into rows, with the loss on the
  responses only.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunekit.data.calibration import IGNORE_INDEX, adds_bos_by_default, calibration_tokens, encode_text
from prunekit.data.sources import NAMED_SOURCES, SELF_SOURCE, DataError, PromptResponse, load_pairs

PAIR_SOURCES = ("alpaca",)  # named sets read as prompt/response pairs


@dataclass(frozen=True)
class RecoveryData:
    source: str = "c4"             # text source or "self"; or, with pairs=True, "alpaca" / a .jsonl of prompt+response
    pairs: bool = False            # prompt/response pairs with the loss on the responses
    seq_len: int = 512
    held_out: int = 16             # rows kept apart for the held-out perplexity
    seed: int = 0
    data_dir: str | None = None

    def validate(self) -> None:
        if self.seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.held_out < 0:
            raise DataError(f"held_out must be 0 or more rows, got {self.held_out}")
        spec = self.source
        if self.pairs:
            if spec not in PAIR_SOURCES and not spec.endswith(".jsonl"):
                raise DataError(f"prompt/response data must be one of {list(PAIR_SOURCES)} or a .jsonl file with prompt "
                                f"and response fields, got {spec!r}")
        elif spec != SELF_SOURCE and spec not in NAMED_SOURCES and not _is_file_spec(spec):
            raise DataError(f"unknown recovery data {spec!r}; use one of {sorted(NAMED_SOURCES) + [SELF_SOURCE]} or a "
                            f".txt / .jsonl[:field] file (prompt/response data: pass pairs)")
        if _is_file_spec(spec) and not Path(spec.split(":")[0]).is_file():
            raise DataError(f"recovery data file {spec.split(':')[0]} does not exist; pass an existing file")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".txt", ".jsonl")) or ".jsonl:" in spec


def pack_pairs(pairs: list[PromptResponse], tokenizer, *, n_rows: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_rows rows of seq_len tokens cut from the shuffled examples laid end to end, and their labels
    (IGNORE_INDEX on prompts). Raises DataError when the examples hold fewer tokens than asked."""
    bos = [tokenizer.bos_token_id] if adds_bos_by_default(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    ids: list[int] = []
    labels: list[int] = []
    needed = n_rows * seq_len
    for index in order:
        prompt = bos + encode_text(tokenizer, pairs[index].prompt)
        response = encode_text(tokenizer, pairs[index].response) + eos
        ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + response
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise DataError(f"the prompt/response data holds {len(ids):,} tokens, fewer than the {n_rows} rows x {seq_len} "
                        f"tokens asked for; lower the token budget or seq_len, or use more data")
    return (torch.tensor(ids[:needed]).view(n_rows, seq_len), torch.tensor(labels[:needed]).view(n_rows, seq_len))


def recovery_rows(data: RecoveryData, tokenizer, n_rows: int, *, teacher: torch.nn.Module | None = None,
                  batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of n_rows + data.held_out rows; the held-out rows are the last ones."""
    data.validate()
    total = n_rows + data.held_out
    if data.pairs:
        pairs = load_pairs(data.source, data_dir=data.data_dir)
        return pack_pairs(pairs, tokenizer, n_rows=total, seq_len=data.seq_len, seed=data.seed)
    ids = calibration_tokens(data.source, tokenizer, n_samples=total, seq_len=data.seq_len, seed=data.seed,
                             data_dir=data.data_dir, model=teacher, batch_size=batch_size)
    return ids, ids.clone()


def describe(data: RecoveryData) -> str:
    kind = "prompt/response pairs, loss on responses" if data.pairs else "text"
    where = data.data_dir or os.environ.get("PRUNEKIT_DATA_DIR") or "the hub"
    return f"{data.source} ({kind}, {data.seq_len}-token rows, seed {data.seed}, data from {where})"
