"""Tiny random models of every supported family, and a byte-level tokenizer, built in-process.

No test may need the Hugging Face Hub, so everything a test loads is made here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

VOCAB = 300  # 256 byte tokens plus a few specials, rounded up

# One tiny config per family, exercising its quirks: GQA (8 query / 2 KV heads), an explicit
# head_dim that differs from hidden/heads, sliding-window layer types, q/k norms, soft-capping,
# fused projections.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(attention_bias=False, tie_word_embeddings=False),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(),
    "gemma2": dict(sliding_window=6, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(sliding_window=6, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    kwargs.update(TINY_CONFIGS[family])
    kwargs.update(overrides)
    if family not in ("phi3",):
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `family`, fp32, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb every parameter so that no
    # index mix-up can hide behind identical values.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte, ids 3..258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # alphabet() comes in a different order on every call: sort it, or token ids change between calls.
    byte_vocab = {ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **byte_vocab}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# Calibration text for the recipe tests: short, repetitive, so that a byte tokenizer fills rows quickly.
RECIPE_TEXT = "The cat sat on the mat. The dog sat on the log. A bird sat on the wire and sang. " * 60


def saved_tiny_llama(directory: Path) -> tuple[str, str]:
    """A tiny llama saved with the byte tokenizer as `directory`/dense, and `directory`/text.txt to
    calibrate it on: (model path, text path), what a recipe's `model` and calibration `source` name."""
    import prunekit

    prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=256), byte_tokenizer(),
                        directory / "dense")
    text = directory / "text.txt"
    text.write_text(RECIPE_TEXT)
    return str(directory / "dense"), str(text)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path | None:
    """The shared data sets, when they lie beside the checkout (as in CI) or PRUNEKIT_DATA_DIR names them."""
    env = os.environ.get("PRUNEKIT_DATA_DIR")
    for candidate in (env, Path(__file__).resolve().parents[1].parent / "shared" / "data"):
        if candidate and (Path(candidate) / "README.md").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all overhead: on a shared 2-core machine, two spinning threads can slow them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zero_contributions(model, layer: int, *, head_dim: int, heads=(), channels=(), attention=False, mlp=False) -> None:
    """Zero what removed parts add to the residual stream: o_proj columns of heads, down_proj
    columns of channels, all of o_proj / down_proj for a whole sublayer."""
    from prunekit import architecture_for
    from prunekit.models.modeling_prunekit import decoder_layers

    arch = architecture_for(model.config.model_type)
    decoder = decoder_layers(model, arch.to_dict())[layer]
    o_proj = getattr(getattr(decoder, arch.attention), arch.o_proj)
    down = getattr(getattr(decoder, arch.mlp), arch.down_proj)
    with torch.no_grad():
        for h in heads:
            o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
        for c in channels:
            down.weight[:, c] = 0
        if attention:
            o_proj.weight.zero_()
        if mlp:
            down.weight.zero_()


# Tiny mixtures of experts (issue 23), kept apart from TINY_CONFIGS so that the dense-family tests
# do not run on them: 6 routed experts, top-2, experts narrower than a dense FFN; Qwen3-MoE with a
# dense layer among the sparse ones (mlp_only_layers) and renormalised top-k, Qwen2-MoE with a
# shared expert and top-k left unnormalised.
TINY_MOE_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, sliding_window=None),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                      shared_expert_intermediate_size=40),
    # q_norm spans hidden_size, so heads x head_dim must equal it
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, intermediate_size=32, head_dim=6, norm_topk_prob=False),
}
MOE_FAMILIES = sorted(TINY_MOE_CONFIGS)


def tiny_moe_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised MoE causal LM of `family` (see tiny_model), with router weights
    large enough that routing differs from token to token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
        rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(TINY_MOE_CONFIGS[family])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("mlp.gate.weight") else 0.05))
    return model.eval()


def assert_reloads_as_saved(model, directory: Path, ids, structure) -> None:
    """A pruned model saved in `directory` with remote code: transformers (trust_remote_code) and
    prunekit's loader both give back its logits on `ids`, and prunekit's its `structure`."""
    from transformers import AutoModelForCausalLM

    from prunekit.models.loading import load
    from prunekit.models.structure import model_structure

    expected = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    ours, _ = load(str(directory))
    assert model_structure(ours) == structure
    torch.testing.assert_close(ours.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request) -> str:
    return request.param
