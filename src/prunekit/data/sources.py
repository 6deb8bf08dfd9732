"""Text sources for calibration, recovery and evaluation.

A source spec is one string:

- a named set from `NAMED_SOURCES` (`wikitext2`, `c4`, `ptb`, `alpaca`): read from the local
  copy in the data dir (the `data_dir` argument, else `$PRUNEKIT_DATA_DIR`), and fetched from
  the Hugging Face Hub with `datasets` only where no local copy exists;
- `path/to/file.txt`: the whole file is ONE document. Prose files keep their paragraph structure
  this way (WikiText itself separates paragraphs by blank lines); put one document per line of a
  .jsonl file to get several documents;
- `path/to/file.jsonl` or `path/to/file.jsonl:FIELD`: one document per line, taken from the
  string field FIELD (default `text`).

`load_texts` turns a spec into a list of documents. WikiText-2 and PTB come back as a single
running text each, as the pruning literature evaluates and calibrates on them.
"""
from __future__ import annotations

import functools
import io
import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from prunekit.errors import PrunekitError

DATA_DIR_ENV = "PRUNEKIT_DATA_DIR"
DOCUMENT_SEPARATOR = "\n\n"
DEFAULT_JSONL_FIELD = "text"
# Text sampled from the model itself; only calibration can produce it, so it has no loader here.
SELF_SOURCE = "self"

TextProtocol = Literal["raw", "joined"]
TEXT_PROTOCOLS: tuple[TextProtocol, ...] = ("raw", "joined")


class DataError(PrunekitError, ValueError):
    """A data source is missing, malformed, or too small for what was asked of it."""


@dataclass(frozen=True)
class PromptResponse:
    """One instruction-tuning example: the loss falls on `response` only."""

    prompt: str
    response: str


# --------------------------------------------------------------------------- data dir and files


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding local copies: `data_dir` when given, else $PRUNEKIT_DATA_DIR, else None."""
    chosen = data_dir if data_dir is not None else (os.environ.get(DATA_DIR_ENV) or None)
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "data_dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise DataError(
            f"{origin} {str(path)!r} is not a folder; pass --data-dir / set {DATA_DIR_ENV} "
            "to the folder that holds the shared data sets."
        )
    return path


def read_text_file(path: str | os.PathLike) -> str:
    """The file's text, decoded as UTF-8 with its bytes kept as they are (no newline translation)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"text source {str(path)!r} does not exist; check the path.")
    if not path.is_file():
        raise DataError(f"text source {str(path)!r} is not a file; point to a .txt or .jsonl file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (invalid byte at offset {err.start}); "
            "re-encode it as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{str(path)!r} is empty; point to a file that holds text.")
    return text


def read_jsonl_field(path: str | os.PathLike, field: str = DEFAULT_JSONL_FIELD) -> list[str]:
    """The string `field` of every JSON object in a .jsonl file, one document per line."""
    text = read_text_file(path)
    texts = []
    # Split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_json_line(path, line_number, line)
        if field not in record:
            present = ", ".join(sorted(record)) or "none"
            raise DataError(
                f"{path}:{line_number} has no field {field!r} (fields: {present}); "
                f"name the text field as '{path}:FIELD'."
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{line_number}: field {field!r} holds {type(value).__name__}, not text; "
                f"name a string field as '{path}:FIELD'."
            )
        texts.append(value)
    return texts


def _parse_json_line(path: str | os.PathLike, line_number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{line_number} is not valid JSON ({err.msg}); "
            "each line of a .jsonl file must hold one JSON object."
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{line_number} holds a JSON {type(record).__name__}, not an object; "
            "each line of a .jsonl file must hold one JSON object."
        )
    return record


def join_documents(texts: Sequence[str]) -> str:
    """One running text from several documents, the way evaluation and calibration streams see them."""
    return DOCUMENT_SEPARATOR.join(texts)


# --------------------------------------------------------------------------- the named sets
# Each set reads its rows (file lines, documents, sentences, records) from a local file or from
# the hub, then turns them into documents; local and hub rows have the same shape.


def wikitext_text(lines: Sequence[str], text_protocol: TextProtocol) -> str:
    """WikiText-2 as one string under one of the two protocols.

    `raw`: the lines concatenated, i.e. the file as it is. `joined`: whitespace-only lines become
    "" and the lines are joined with "\\n\\n", which reproduces the Hugging Face rows joined the
    way SparseGPT, Wanda and LLM-Pruner compute perplexity.
    """
    if text_protocol == "raw":
        return "".join(lines)
    return DOCUMENT_SEPARATOR.join(line if line.strip() else "" for line in lines)


def _wikitext_lines_local(path: Path) -> list[str]:
    # Iterating a StringIO cuts at "\n" only, as the Hugging Face builder did when it made the rows.
    return list(io.StringIO(read_text_file(path)))


def _wikitext_lines_hub(split: str) -> list[str]:
    # The hub rows hold "" for whitespace-only lines, so `raw` rebuilt from them lacks those lines'
    # single space and newline: close to the file, not byte-identical.
    return _hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]


def _wikitext_documents(lines: list[str], text_protocol: TextProtocol) -> list[str]:
    return [wikitext_text(lines, text_protocol)]


def _c4_documents_local(path: Path) -> list[str]:
    return read_jsonl_field(path, "text")


def _c4_documents_hub(split: str) -> list[str]:
    # The first shard of each split: SparseGPT and Wanda draw calibration data from train shard 0.
    shard = "c4-train.00000-of-01024.json.gz" if split == "train" else "c4-validation.00000-of-00008.json.gz"
    return _hub_dataset("allenai/c4", data_files={split: f"en/{shard}"}, split=split)["text"]


def _documents_as_they_are(documents: list[str], text_protocol: TextProtocol) -> list[str]:
    return documents


def _ptb_sentences_local(path: Path) -> list[str]:
    # The Mikolov files (ptb.test.txt, ...) hold one sentence per line, as the hub rows do.
    return [line.strip() for line in read_text_file(path).split("\n") if line.strip()]


def _ptb_sentences_hub(split: str) -> list[str]:
    return _hub_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]


def _ptb_documents(sentences: list[str], text_protocol: TextProtocol) -> list[str]:
    # PTB "sentences" are pieces of one corpus; SparseGPT joins them with single spaces.
    return [" ".join(sentences)]


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_pair(record: Mapping[str, Any]) -> PromptResponse:
    """An Alpaca record (instruction, input, output) in the standard Stanford Alpaca prompt template."""
    template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
    prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return PromptResponse(prompt=prompt, response=record["output"])


def _alpaca_records_local(path: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{str(path)!r} is not valid JSON ({err.msg}); restore the Alpaca file.") from None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise DataError(f"{str(path)!r} is not a JSON list of Alpaca records; restore the Alpaca file.")
    for index, record in enumerate(records):
        missing = {"instruction", "output"} - set(record)
        if missing:
            raise DataError(
                f"{str(path)!r} record {index} lacks {', '.join(sorted(missing))} "
                f"(fields: {', '.join(sorted(record))}); Alpaca records need instruction, input and output."
            )
    return records


def _alpaca_records_hub(split: str) -> list[dict[str, Any]]:
    return list(_hub_dataset("tatsu-lab/alpaca", split=split))


def _alpaca_documents(records: list[dict[str, Any]], text_protocol: TextProtocol) -> list[str]:
    return [pair.prompt + pair.response for pair in map(alpaca_pair, records)]


def _hub_dataset(*args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, imported late: it is heavy and only needed without a local copy."""
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


@dataclass(frozen=True)
class NamedSource:
    """A public text set: its local copy under the data dir, its hub copy, and how rows become documents."""

    description: str
    local_files: Mapping[str, str]  # split -> path relative to the data dir
    hub_splits: tuple[str, ...]
    default_split: str
    read_local: Callable[[Path], list[Any]]
    read_hub: Callable[[str], list[Any]]
    to_documents: Callable[[list[Any], TextProtocol], list[str]]
    hub_repo: str                   # the Hub dataset `read_hub` fetches, to look for a cached copy offline
    text_protocols: tuple[TextProtocol, ...] = ("raw",)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.local_files, *self.hub_splits]))


NAMED_SOURCES: dict[str, NamedSource] = {
    "wikitext2": NamedSource(
        description="WikiText-2 raw as one running text (the evaluation standard)",
        local_files={"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
        hub_splits=("train", "validation", "test"),
        default_split="test",
        read_local=_wikitext_lines_local,
        read_hub=_wikitext_lines_hub,
        to_documents=_wikitext_documents,
        hub_repo="Salesforce/wikitext",
        text_protocols=TEXT_PROTOCOLS,
    ),
    "c4": NamedSource(
        description="C4 English web documents (the calibration standard)",
        local_files={"train": "c4/c4_en_train_shard00000_first1000.jsonl"},
        hub_splits=("train", "validation"),
        default_split="train",
        read_local=_c4_documents_local,
        read_hub=_c4_documents_hub,
        to_documents=_documents_as_they_are,
        hub_repo="allenai/c4",
    ),
    "ptb": NamedSource(
        description="Penn Treebank sentences joined into one running text",
        # Not in the shared data: read from the hub unless someone drops the Mikolov files in.
        local_files={"train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
        hub_splits=("train", "validation", "test"),
        default_split="test",
        read_local=_ptb_sentences_local,
        read_hub=_ptb_sentences_hub,
        to_documents=_ptb_documents,
        hub_repo="ptb_text_only",
    ),
    "alpaca": NamedSource(
        description="Stanford Alpaca examples in the Alpaca prompt template, prompt and response together",
        local_files={"train": "alpaca/alpaca_first100.json"},
        hub_splits=("train",),
        default_split="train",
        read_local=_alpaca_records_local,
        read_hub=_alpaca_records_hub,
        to_documents=_alpaca_documents,
        hub_repo="tatsu-lab/alpaca",
    ),
}


def _read_rows(name: str, split: str, data_dir: str | os.PathLike | None) -> list[Any]:
    """A named set's rows: the local copy when the data dir holds one, else the hub's."""
    source = NAMED_SOURCES[name]
    local_dir = resolve_data_dir(data_dir)
    local_file = source.local_files.get(split)
    if local_dir is not None and local_file is not None and (local_dir / local_file).exists():
        return source.read_local(local_dir / local_file)
    # Refuse at once where the Hub cannot answer: `datasets` would retry for a minute first.
    _check_hub_can_serve(name, split, local_dir)
    try:
        return source.read_hub(split)
    except Exception as err:
        if local_file is None:
            missing = f"{name} keeps no local copy of {split!r}"
            fix = f"use a split that has one ({', '.join(source.local_files)}) with --data-dir / {DATA_DIR_ENV} set"
        else:
            missing = "no data dir is set" if local_dir is None else f"{local_dir / local_file} does not exist"
            fix = f"pass --data-dir / set {DATA_DIR_ENV} to a folder that holds {local_file}"
        raise DataError(
            f"cannot load {name} split {split!r}: {missing} and the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}); {fix}."
        ) from err


# --------------------------------------------------------------------------- the Hub, offline

HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_PROBE_SECONDS = 3.0


def hub_offline_variable() -> str | None:
    """The environment variable that puts the Hugging Face Hub offline, when one is set."""
    for variable in HUB_OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return variable
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


@functools.lru_cache(maxsize=8)
def _can_connect(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:  # no DNS, refused, unreachable or timed out: every way the Hub can be absent
        return False


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot serve a download now (one TCP connect, a few seconds at most, then
    remembered for the process); None when it can be tried."""
    variable = hub_offline_variable()
    if variable is not None:
        return f"{variable}=1 keeps the Hugging Face Hub offline"
    if not _can_connect(hub_endpoint()):
        return f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached from this machine"
    return None


def _hub_cache_dirs() -> list[Path]:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub").expanduser()
    datasets = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    return [hub, datasets]


def hub_copy_is_cached(repo: str) -> bool:
    """Whether an earlier download of the Hub dataset `repo` left a copy that `datasets` reads offline."""
    hub, datasets = _hub_cache_dirs()
    return (hub / f"datasets--{repo.replace('/', '--')}").is_dir() or (datasets / repo.replace("/", "___")).is_dir()


def _check_hub_can_serve(name: str, split: str, local_dir: Path | None, option: str = "--data-dir") -> None:
    source = NAMED_SOURCES[name]
    if hub_copy_is_cached(source.hub_repo):
        return  # `datasets` reads its own cache offline
    reason = hub_unreachable_reason()
    if reason is None:
        return
    local_file = source.local_files.get(split)
    if local_file is None:
        missing = f"{name} keeps no local copy of split {split!r}"
        fix = f"use a split that has one ({', '.join(source.local_files)})"
    else:
        missing = ("no data directory is set" if local_dir is None
                   else f"the data directory {local_dir} has no {local_file}")
        fix = f"set {DATA_DIR_ENV} (or pass {option}) to a folder that holds {local_file}"
    raise DataError(f"{name} ({split}) cannot be read: {missing} and {reason}; {fix}, or name a local .txt/.jsonl file "
                    f"instead, or use '{SELF_SOURCE}' where calibrating (text the model writes itself).")


@dataclass(frozen=True)
class ResolvedSource:
    """Where a text source will be read from, settled before any model is loaded."""

    spec: str
    kind: Literal["self", "file", "local", "hub"]
    split: str | None = None
    path: Path | None = None      # the file read, for "file" and "local"


def resolve_source(
    spec: str, data_dir: str | os.PathLike | None = None, *, split: str | None = None, allow_self: bool = True,
) -> ResolvedSource:
    """Check, in seconds and without a model, that `spec` can be read: a file that exists, a named set
    with a local copy in the data dir, or a named set the Hub can serve now (a cached copy, or a Hub
    that answers one connection). Raises DataError naming the fixes otherwise. `allow_self`: whether
    'self' (text the model writes, calibration and recovery only) is accepted."""
    if spec == SELF_SOURCE:
        if not allow_self:
            raise DataError(f"'{SELF_SOURCE}' (text the model writes) applies to calibration and recovery only; "
                            "name a named set or a local .txt/.jsonl file here.")
        return ResolvedSource(spec, "self")
    split = resolve_split(spec, split)
    file_spec = parse_file_spec(spec)
    if file_spec is not None:
        path = file_spec[0]
        if not path.is_file():
            raise DataError(f"text source {str(path)!r} " + ("is not a file" if path.exists() else "does not exist")
                            + "; check the path.")
        return ResolvedSource(spec, "file", None, path)
    local_dir = resolve_data_dir(data_dir)
    local_file = NAMED_SOURCES[spec].local_files.get(split)
    if local_dir is not None and local_file is not None and (local_dir / local_file).is_file():
        return ResolvedSource(spec, "local", split, local_dir / local_file)
    _check_hub_can_serve(spec, split, local_dir)
    return ResolvedSource(spec, "hub", split)


# --------------------------------------------------------------------------- specs


def _unknown_source_message(spec: str) -> str:
    return (
        f"unknown text source {spec!r}; use a named set ({', '.join(sorted(NAMED_SOURCES))}), "
        f"'{SELF_SOURCE}' (calibration only), or a path to a .txt file or a .jsonl file "
        "(path.jsonl or path.jsonl:FIELD)."
    )


def parse_file_spec(spec: str) -> tuple[Path, str | None] | None:
    """(path, jsonl field) for a file spec, with field None for .txt; None when `spec` names no file."""
    if spec.endswith(".txt"):
        return Path(spec), None
    if spec.endswith(".jsonl"):
        return Path(spec), DEFAULT_JSONL_FIELD
    path, colon, field = spec.rpartition(":")
    if colon and path.endswith(".jsonl"):
        if not field:
            raise DataError(f"text source {spec!r} ends in ':' without a field; write 'path.jsonl:FIELD'.")
        return Path(path), field
    return None


def resolve_split(spec: str, split: str | None) -> str | None:
    """The split a spec reads: `split`, else the named set's default; None for files."""
    if parse_file_spec(spec) is not None:
        if split is not None:
            raise DataError(f"split={split!r} applies only to named sets, but {spec!r} is a file; drop the split.")
        return None
    if spec not in NAMED_SOURCES:
        raise DataError(_unknown_source_message(spec))
    source = NAMED_SOURCES[spec]
    split = source.default_split if split is None else split
    if split not in source.splits:
        raise DataError(f"{spec} has no split {split!r}; choose one of {', '.join(source.splits)}.")
    return split


def load_texts(
    spec: str,
    *,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    text_protocol: TextProtocol = "raw",
) -> list[str]:
    """The documents of a text source (see the module docstring for the spec syntax).

    `split` defaults to the named set's default (test for wikitext2 and ptb, train for c4 and
    alpaca) and must stay None for files. `text_protocol` picks one of the two WikiText-2
    conventions (see `wikitext_text`); every other source knows only `raw`.
    """
    if text_protocol not in TEXT_PROTOCOLS:
        raise DataError(f"unknown text protocol {text_protocol!r}; choose one of {', '.join(TEXT_PROTOCOLS)}.")
    if spec == SELF_SOURCE:
        raise DataError(
            f"'{SELF_SOURCE}' is text sampled from the model, not a stored source; "
            "use calibration_tokens('self', ..., model=model)."
        )
    split = resolve_split(spec, split)
    file_spec = parse_file_spec(spec)
    if file_spec is not None:
        if text_protocol != "raw":
            raise DataError(f"text protocol {text_protocol!r} applies only to wikitext2; use 'raw' for {spec!r}.")
        path, field = file_spec
        return [read_text_file(path)] if field is None else read_jsonl_field(path, field)

    source = NAMED_SOURCES[spec]
    if text_protocol not in source.text_protocols:
        raise DataError(
            f"text protocol {text_protocol!r} does not apply to {spec}; use {', '.join(source.text_protocols)}."
        )
    return source.to_documents(_read_rows(spec, split, data_dir), text_protocol)


def load_pairs(
    spec: str, *, split: str | None = None, data_dir: str | os.PathLike | None = None
) -> list[PromptResponse]:
    """Prompt/response pairs: `alpaca`, or a .jsonl file whose objects hold `prompt` and `response`."""
    if spec == "alpaca":
        return [alpaca_pair(record) for record in _read_rows(spec, resolve_split(spec, split), data_dir)]
    if spec.endswith(".jsonl"):
        if split is not None:
            raise DataError(f"split={split!r} applies only to named sets, but {spec!r} is a file; drop the split.")
        prompts = read_jsonl_field(spec, "prompt")
        responses = read_jsonl_field(spec, "response")
        return [PromptResponse(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
    raise DataError(
        f"unknown prompt/response source {spec!r}; use 'alpaca' or a .jsonl file with "
        "'prompt' and 'response' fields."
    )
