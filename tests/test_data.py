"""Text sources, calibration windows, self-sampled text and prompt/response batches."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tokenizers.processors import TemplateProcessing

from prunekit import LayerPlan, Plan, apply_plan, model_structure
from prunekit.data import (
    DATA_DIR_ENV,
    IGNORE_INDEX,
    NAMED_SOURCES,
    DataError,
    PromptResponse,
    adds_bos_by_default,
    calibration_tokens,
    encode_text,
    load_pairs,
    load_texts,
    sample_self_tokens,
    task_tokens,
)
from prunekit.data import calibration, sources
from prunekit.data.calibration import _cache_keyword, _sample_next_token
from prunekit.models.loading import cast_copy
from prunekit.models.memory import sampling_bytes_per_row


@pytest.fixture
def data_dir(shared_data_dir: Path | None) -> Path:
    if shared_data_dir is None:
        pytest.skip(f"shared data sets not found: set {DATA_DIR_ENV} or put ../shared/data beside the checkout")
    return shared_data_dir


@pytest.fixture
def bos_tokenizer(tokenizer):
    """The byte tokenizer, made to add BOS on encode the way Gemma's does."""
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


@pytest.fixture
def offline_hub(monkeypatch):
    """A Hub that answers the reachability probe, then fails the download."""
    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(sources, "_hub_dataset", unreachable)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def long_documents(n: int, words: int = 40) -> list[dict]:
    return [{"text": " ".join(f"doc{i}-word{j}" for j in range(words))} for i in range(n)]


# --------------------------------------------------------------------------- named sets, local copies


@pytest.mark.parametrize("split, file", [("test", "wiki.test.raw"), ("validation", "wiki.valid.raw")])
def test_wikitext2_raw_is_the_file_as_it_is(data_dir, split, file):
    texts = load_texts("wikitext2", split=split, data_dir=data_dir)
    assert texts == [(data_dir / "wikitext-2-raw" / file).read_bytes().decode("utf-8")]


def test_wikitext2_joined_maps_blank_lines_to_empty_and_joins_with_blank_lines(data_dir):
    (joined,) = load_texts("wikitext2", data_dir=data_dir, text_protocol="joined")
    lines = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == 4358
    assert joined.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    kept = sum(len(line) + 1 for line in lines if line.strip())  # +1: each kept line keeps its "\n"
    assert len(joined) == kept + 2 * (len(lines) - 1)


def test_c4_reads_the_local_shard(data_dir):
    texts = load_texts("c4", data_dir=data_dir)
    assert len(texts) == 1000
    assert texts[0].startswith("Beginners BBQ Class Taking Place in Missoula!")


def test_alpaca_texts_and_pairs_follow_the_released_template(data_dir):
    records = json.loads((data_dir / "alpaca" / "alpaca_first100.json").read_text(encoding="utf-8"))
    texts = load_texts("alpaca", data_dir=data_dir)
    pairs = load_pairs("alpaca", data_dir=data_dir)
    assert texts == [record["text"] for record in records]
    assert [pair.prompt + pair.response for pair in pairs] == texts
    assert all(pair.prompt.endswith("### Response:\n") for pair in pairs)
    assert all(("### Input:" in pair.prompt) == bool(record["input"]) for pair, record in zip(pairs, records))


def test_data_dir_comes_from_the_environment(data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert len(load_texts("c4")) == 1000


def test_ptb_reads_local_mikolov_files(tmp_path, offline_hub):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york\n")
    assert load_texts("ptb", data_dir=tmp_path) == ["no it was n't black monday but while the new york"]


def test_named_sets_fall_back_to_the_hub_without_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(sources, "_hub_dataset", lambda *args, **kwargs: {"text": [" = A = \n", "", " b \n"]})
    assert load_texts("wikitext2", data_dir=tmp_path, text_protocol="joined") == [" = A = \n\n\n\n\n b \n"]


def test_hub_failure_says_how_to_point_at_local_data(tmp_path, offline_hub):
    with pytest.raises(DataError, match=f"Hub failed.*set {DATA_DIR_ENV} to a folder that holds wikitext-2-raw"):
        load_texts("wikitext2", data_dir=tmp_path)
    with pytest.raises(DataError, match="ptb/ptb.test.txt"):
        load_texts("ptb", data_dir=tmp_path)


# --------------------------------------------------------------------------- resolved before the model loads


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """No data dir and an empty Hugging Face cache: only the Hub could serve a named set."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
                     "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    sources._can_connect.cache_clear()
    yield
    sources._can_connect.cache_clear()


def _fails_fast_naming_the_fixes(call, *fragments: str) -> str:
    import time

    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        call()
    assert time.monotonic() - started < 5  # one probe, no retries
    message = str(raised.value)
    assert "\n" not in message
    for fragment in (DATA_DIR_ENV, "--data-dir", "local .txt/.jsonl file", "'self'", *fragments):
        assert fragment in message, message
    return message


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_an_offline_hub_without_a_data_dir_fails_in_one_sentence(no_hub_cache, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")

    def never(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(sources, "_hub_dataset", never)
    message = _fails_fast_naming_the_fixes(lambda: sources.resolve_source("c4"), f"{variable}=1 keeps the Hugging Face Hub "
                                           "offline", "no data directory is set", "c4/c4_en_train_shard00000_first1000.jsonl")
    assert message.startswith("c4 (train) cannot be read")
    # the read itself refuses the same way, before `datasets` would retry
    assert _fails_fast_naming_the_fixes(lambda: load_texts("wikitext2")).startswith("wikitext2 (test) cannot be read")


def test_an_unreachable_hub_is_found_by_one_connection(no_hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    _fails_fast_naming_the_fixes(lambda: sources.resolve_source("wikitext2", data_dir=tmp_path),
                                 "the Hugging Face Hub (http://127.0.0.1:9) cannot be reached",
                                 f"the data directory {tmp_path} has no wikitext-2-raw/wiki.test.raw")


def test_a_cached_hub_copy_is_read_offline(no_hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hf_home" / "hub" / "datasets--allenai--c4").mkdir(parents=True)
    assert sources.resolve_source("c4").kind == "hub"


def test_sources_resolve_without_the_hub_where_they_are_local(data_dir, no_hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.resolve_source("c4", data_dir).path == data_dir / "c4/c4_en_train_shard00000_first1000.jsonl"
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert sources.resolve_source("wikitext2", split="validation").kind == "local"
    assert sources.resolve_source("self").kind == "self"
    text = tmp_path / "mine.txt"
    text.write_text("text")
    assert sources.resolve_source(str(text)).kind == "file"
    write_jsonl(tmp_path / "mine.jsonl", [{"body": "text"}])
    assert sources.resolve_source(f"{tmp_path}/mine.jsonl:body").path == tmp_path / "mine.jsonl"


def test_bad_specs_are_refused_before_any_reading(tmp_path):
    with pytest.raises(DataError, match="does not exist; check the path"):
        sources.resolve_source(str(tmp_path / "absent.jsonl:body"))
    with pytest.raises(DataError, match="unknown text source 'wikitext3'"):
        sources.resolve_source("wikitext3")
    with pytest.raises(DataError, match="calibration and recovery only"):
        sources.resolve_source("self", allow_self=False)
    with pytest.raises(DataError, match="has no split 'dev'"):
        sources.resolve_source("c4", split="dev")


# --------------------------------------------------------------------------- files


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert load_texts(str(path)) == ["first paragraph\n\nsecond paragraph\n"]


def test_jsonl_reads_text_or_the_named_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a", "body": "x"}, {"text": "b", "body": "y"}])
    assert load_texts(str(path)) == ["a", "b"]
    assert load_texts(f"{path}:body") == ["x", "y"]


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(DataError, match="unknown text source 'wikitext3'.*alpaca, c4, ptb, wikitext2"):
        load_texts("wikitext3")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "absent.txt"))


def test_empty_file(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_texts(str(tmp_path / "blank.txt"))


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text \\(invalid byte at offset 3\\); re-encode"):
        load_texts(str(tmp_path / "latin1.txt"))


def test_jsonl_missing_field_lists_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "x", "url": "u"}])
    with pytest.raises(DataError, match=r"docs.jsonl:1 has no field 'text' \(fields: body, url\)"):
        load_texts(str(path))


def test_jsonl_bad_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="docs.jsonl:2 is not valid JSON"):
        load_texts(str(tmp_path / "docs.jsonl"))


def test_bad_split_and_protocol_are_named():
    with pytest.raises(DataError, match="c4 has no split 'test'; choose one of train, validation"):
        load_texts("c4", split="test")
    with pytest.raises(DataError, match="text protocol 'joined' does not apply to c4"):
        load_texts("c4", text_protocol="joined")
    with pytest.raises(DataError, match="unknown text protocol 'cooked'"):
        load_texts("wikitext2", text_protocol="cooked")
    with pytest.raises(DataError, match="applies only to named sets"):
        load_texts("notes.txt", split="train")


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_texts("c4", data_dir=tmp_path / "nowhere")


# --------------------------------------------------------------------------- calibration windows


def test_calibration_is_deterministic_for_a_seed(data_dir, tokenizer):
    def draw(seed: int) -> torch.Tensor:
        return calibration_tokens("c4", tokenizer, n_samples=8, seq_len=64, seed=seed, data_dir=data_dir)

    first = draw(0)
    assert first.shape == (8, 64) and first.dtype == torch.long
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


def test_calibration_windows_come_from_distinct_long_documents(tmp_path, tokenizer):
    docs = long_documents(20)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    windows = calibration_tokens(str(path), tokenizer, n_samples=5, seq_len=50, seed=3)
    encoded = [encode_text(tokenizer, doc["text"]) for doc in docs]
    sources_of = [
        next(i for i, ids in enumerate(encoded) if any(ids[s : s + 50] == row for s in range(len(ids))))
        for row in windows.tolist()
    ]
    assert len(set(sources_of)) == 5


def test_short_documents_are_joined_and_cut_into_distinct_windows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "short.jsonl", long_documents(30, words=3))
    windows = calibration_tokens(str(path), tokenizer, n_samples=6, seq_len=40, seed=0)
    stream = encode_text(tokenizer, "\n\n".join(doc["text"] for doc in long_documents(30, words=3)))
    starts = [next(s for s in range(len(stream)) if stream[s : s + 40] == row) for row in windows.tolist()]
    # Grid windows share one offset modulo seq_len and never overlap.
    assert len({start % 40 for start in starts}) == 1
    assert len(set(starts)) == 6


def test_calibration_prepends_bos_for_tokenizers_that_add_it(tmp_path, bos_tokenizer):
    assert adds_bos_by_default(bos_tokenizer)
    path = write_jsonl(tmp_path / "docs.jsonl", long_documents(4))
    windows = calibration_tokens(str(path), bos_tokenizer, n_samples=4, seq_len=32, seed=0)
    assert windows.shape == (4, 32)
    assert (windows[:, 0] == bos_tokenizer.bos_token_id).all()
    assert (windows[:, 1:] != bos_tokenizer.bos_token_id).all()


def test_too_few_tokens_for_one_window(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("only thirty-one bytes of text.\n", encoding="utf-8")
    with pytest.raises(DataError, match="has 31 tokens, fewer than one window of 64; lower seq_len"):
        calibration_tokens(str(tmp_path / "tiny.txt"), tokenizer, n_samples=1, seq_len=64, seed=0)


def test_too_few_tokens_for_the_samples_requested(tmp_path, tokenizer):
    (tmp_path / "small.txt").write_text("x" * 100, encoding="utf-8")
    message = "has 100 tokens, enough for 3 windows of 32 but n_samples=4.*lower n_samples or seq_len"
    with pytest.raises(DataError, match=message):
        calibration_tokens(str(tmp_path / "small.txt"), tokenizer, n_samples=4, seq_len=32, seed=0)


# --------------------------------------------------------------------------- self-sampled text


def test_self_sampling_is_deterministic_and_full_length(tokenizer):
    model = tiny_model("llama")

    def draw(seed: int) -> torch.Tensor:
        return sample_self_tokens(model, tokenizer, n_samples=3, seq_len=16, seed=seed, batch_size=2, progress=False)

    first = draw(0)
    assert first.shape == (3, 16) and first.dtype == torch.long
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))
    routed = calibration_tokens("self", tokenizer, n_samples=3, seq_len=16, seed=0, batch_size=2, model=model)
    assert torch.equal(first, routed)


def test_sampling_memory_per_row_counts_the_real_kv_cache():
    """The GPU row count rests on this: a row's cache as transformers really holds it (none in a
    layer that lost its attention, less in one that lost a KV group), plus the widest layer's
    cache once more and once per query head of a group, plus four fp32 distributions."""
    model = tiny_model("llama")
    apply_plan(model, Plan(layers={1: LayerPlan(drop_attention=True), 2: LayerPlan(keep_kv_groups=(0,))}))
    seq_len = 12
    with torch.inference_mode():
        output = model(torch.randint(3, 200, (1, seq_len)), use_cache=True)
    per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
                 for layer in output[_cache_keyword(model)].layers if getattr(layer, "keys", None) is not None]
    structure = model_structure(model)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert sampling_bytes_per_row(structure, seq_len, 4) == \
        sum(per_layer) + (1 + group) * max(per_layer) + 16 * structure.vocab_size


def test_gpu_sampling_rows_come_from_a_fixed_budget_not_from_the_free_memory(monkeypatch):
    """The rows per step shape the text, which every process of a launch, and a resumed run, must
    write alike: any GPU with room gets the same rows; only one without room gets fewer, and says so."""
    structure = model_structure(tiny_model("llama"))
    per_row = sampling_bytes_per_row(structure, 64, 2)
    monkeypatch.setattr(calibration, "SELF_TEXT_GPU_BYTES", 10 * per_row + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {calibration.gpu_sampling_rows(structure, 64, 2, free) for free in (10 * per_row, 10**12)} == {10}
    with pytest.warns(UserWarning, match="writing the text 4 rows at a time instead of 10.*free it to reproduce"):
        assert calibration.gpu_sampling_rows(structure, 64, 2, 4 * per_row + 5) == 4
    monkeypatch.setattr(calibration, "SELF_TEXT_GPU_BYTES", 10**15)
    assert calibration.gpu_sampling_rows(structure, 64, 2, 10**16) == calibration.SELF_TEXT_BATCH_GPU


def _params_cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The reference for cast_copy: a full copy, then every parameter cast in place (buffers kept)."""
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(dtype)
    return reference


@pytest.mark.parametrize("pruned", [False, True])
def test_a_cast_copy_computes_what_casting_the_weights_computes_and_leaves_the_model_alone(pruned):
    model = tiny_model("llama", tie_word_embeddings=True)
    if pruned:
        apply_plan(model, Plan(drop_layers=(1,), layers={2: LayerPlan(keep_kv_groups=(0,), keep_channels=tuple(range(40)))}))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    cast = cast_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    assert cast.lm_head.weight is cast.model.embed_tokens.weight  # still one tensor
    assert all(b.dtype == torch.float32 for b in cast.buffers())  # rotary frequencies stay exact
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, _params_cast(model, torch.bfloat16)(ids).logits)
    after = model.state_dict()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], value) for name, value in before.items())


def test_self_sampling_in_another_dtype_samples_the_cast_model(tokenizer):
    model = tiny_model("llama")
    drawn = sample_self_tokens(model, tokenizer, n_samples=3, seq_len=8, seed=0, batch_size=2,
                               dtype=torch.bfloat16, progress=False)
    reference = sample_self_tokens(_params_cast(model, torch.bfloat16), tokenizer, n_samples=3, seq_len=8, seed=0,
                                   batch_size=2, progress=False)
    assert torch.equal(drawn, reference)
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype such as torch.bfloat16, got torch.int64"):
        sample_self_tokens(model, tokenizer, n_samples=1, seq_len=8, seed=0, dtype=torch.int64, progress=False)


def test_the_gpu_samples_from_a_bf16_copy_only_where_it_has_room_for_one():
    model = tiny_model("llama")
    copy_bytes = sum(p.numel() for p in model.parameters()) * 2
    assert calibration.gpu_sampling_dtype(model, free_bytes=copy_bytes) == torch.bfloat16
    with pytest.warns(UserWarning, match="with the model as it is, not a torch.bfloat16 copy"):
        assert calibration.gpu_sampling_dtype(model, free_bytes=copy_bytes - 1) is None
    assert calibration.gpu_sampling_dtype(model.to(torch.bfloat16), free_bytes=0) is None  # already bf16


def test_self_sampling_needs_the_model(tokenizer):
    with pytest.raises(DataError, match="pass model="):
        calibration_tokens("self", tokenizer, n_samples=1, seq_len=8, seed=0)


def test_nucleus_sampling_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(_sample_next_token(logits, 1.0, 0.5, generator)) for _ in range(50)}
    assert draws == {1}
    draws = {int(_sample_next_token(logits, 1.0, 0.85, generator)) for _ in range(200)}
    assert draws == {1, 2}


# --------------------------------------------------------------------------- prompt/response pairs


def test_task_tokens_score_the_response_only(tokenizer):
    pairs = [PromptResponse("Q: 2+2?\nA:", " 4"), PromptResponse("Say hi.\n", "hi there")]
    input_ids, labels = task_tokens(pairs, tokenizer, seq_len=24)
    assert input_ids.shape == labels.shape == (2, 24)
    for row, pair in enumerate(pairs):
        prompt = encode_text(tokenizer, pair.prompt)
        response = encode_text(tokenizer, pair.response) + [tokenizer.eos_token_id]
        end = len(prompt) + len(response)
        assert input_ids[row, :end].tolist() == prompt + response
        assert (labels[row, : len(prompt)] == IGNORE_INDEX).all()
        assert labels[row, len(prompt) : end].tolist() == response
        assert (labels[row, end:] == IGNORE_INDEX).all()
        assert (input_ids[row, end:] == tokenizer.pad_token_id).all()


def test_task_tokens_from_alpaca(data_dir, tokenizer):
    input_ids, labels = task_tokens(load_pairs("alpaca", data_dir=data_dir)[:4], tokenizer, seq_len=512)
    assert input_ids.shape == (4, 512)
    assert ((labels != IGNORE_INDEX).sum(dim=1) > 0).all()


def test_task_tokens_drop_pairs_whose_prompt_fills_the_window(tokenizer):
    pairs = [PromptResponse("x" * 30, "y"), PromptResponse("short", "answer")]
    with pytest.warns(UserWarning, match="1 of 2 pairs dropped"):
        input_ids, _ = task_tokens(pairs, tokenizer, seq_len=16)
    assert input_ids.shape == (1, 16)
    with pytest.raises(DataError, match="raise seq_len"):
        task_tokens(pairs[:1], tokenizer, seq_len=16)


def test_every_named_source_has_a_default_split_it_offers():
    for name, source in NAMED_SOURCES.items():
        assert source.default_split in source.splits, name
