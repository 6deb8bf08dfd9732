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
