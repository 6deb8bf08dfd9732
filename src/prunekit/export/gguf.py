"""Write a (pruned) model as a llama.cpp GGUF file, optionally quantized by llama.cpp itself.

What llama.cpp builds (read from its loader, src/models/llama.cpp and deci.cpp, as vendored by
llama-cpp-python 0.3.36):

- `llama` reads head counts and FFN width per layer into its hparams, but creates every layer's
  tensors with layer 0's sizes, so it only loads models whose layers all have one shape. Uniform
  models are written as `llama`, the architecture every llama.cpp build knows best.
- `deci` (Llama-3_1-Nemotron-51B) creates each layer with its own head count, KV head count and
  FFN width, and skips the attention of a layer with zero heads (its norm too). Models whose
  layers differ are written as `deci`. Three corners of its loader and graph need care, handled here:
  * a layer with attention but zero FFN width `continue`s before it adds the attention output
    to the residual stream, so that attention would be lost: such a layer gets an all-zero FFN
    of `ZERO_FFN_WIDTH` channels (it adds exactly zero);
  * the head size is read only when layer 0 has heads, so a layer 0 without attention gets one
    all-zero attention head (it adds exactly zero);
  * a layer with neither sublayer is the identity and is not written at all.

Quantized files are made from the f16 file by llama.cpp's own quantizer (llama-cpp-python),
so they are exactly what `llama-quantize` would make.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError
# The same permissions and disk-full message as every other output.
from prunekit.export.files import OutputExistsError, default_mode, disk_full, overlapped_input
from prunekit.models.architecture import architecture_for
from prunekit.models.modeling_prunekit import decoder_layers, head_dim_of, moe_parts
from prunekit.models.structure import LayerShape, model_structure


log = logging.getLogger(__name__)


class GGUFExportError(PrunekitError, ValueError):
    """The model, tokenizer or options cannot be written as a GGUF file that llama.cpp loads."""


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class GGUFFamily:
    uniform_arch: str           # GGUF architecture for models whose layers all have one shape
    per_layer_arch: str         # GGUF architecture that builds each layer with its own widths
    rope_interleaved: bool      # llama.cpp ropes adjacent pairs: q/k rows are permuted from HF's halves
    rope_types: tuple[str, ...]  # config.rope_parameters["rope_type"] values llama.cpp reproduces
    qk_norms: bool = False      # per-head q_norm / k_norm (Qwen3): written as attn_q_norm / attn_k_norm


# prunekit family -> how llama.cpp loads it. A family missing here cannot be exported.
GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(uniform_arch="llama", per_layer_arch="deci", rope_interleaved=True,
                        rope_types=("default", "linear", "llama3")),
    # llama.cpp reads Mixtral as `llama` with expert tensors; it builds every layer with one expert
    # count, so only uniform Mixtral models export (no per-layer architecture: "").
    "mixtral": GGUFFamily(uniform_arch="llama", per_layer_arch="", rope_interleaved=True, rope_types=("default",)),
    # llama.cpp's qwen3moe: every layer sparse (no mlp_only_layers), top-k always renormalised.
    "qwen3_moe": GGUFFamily(uniform_arch="qwen3moe", per_layer_arch="", rope_interleaved=False, rope_types=("default",),
                            qk_norms=True),
}

# Architecture-table role -> GGUF tensor (gguf.MODEL_TENSOR member name); "weight"/"bias" appended.
LAYER_TENSORS: dict[str, str] = {
    "q_proj": "ATTN_Q", "k_proj": "ATTN_K", "v_proj": "ATTN_V", "o_proj": "ATTN_OUT",
    "gate_proj": "FFN_GATE", "up_proj": "FFN_UP", "down_proj": "FFN_DOWN",
    "attention_norm": "ATTN_NORM", "mlp_norm": "FFN_NORM",
}

# --quant name -> llama-cpp-python ftype constant (None: written directly, no quantizer).
QUANT_TYPES: dict[str, str | None] = {
    "f16": None,
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
# GGML types each --quant asks llama.cpp for (F32: norms, always). Any other type in the file is a
# fallback llama.cpp chose: k-quants pack 256 values per block, so a matrix whose rows are not a
# multiple of 256 (SmolLM2's hidden 576, most pruned widths) is stored as Q5_0 / Q8_0 instead.
QUANT_INTENDED: dict[str, tuple[str, ...]] = {
    "f16": ("F16", "F32"),
    "q8_0": ("Q8_0", "F32"),
    "q4_k_m": ("Q4_K", "Q6_K", "F32"),
}

# Hugging Face pre-tokenizer (tokenizer.json, offsets-only fields dropped) -> llama.cpp's
# `tokenizer.ggml.pre`, whose regexes in src/llama-vocab.cpp split text the same way.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_SPLIT = {
    "type": "Split", "behavior": "Isolated", "invert": False,
    "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                         "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
}
PRE_TOKENIZERS: list[tuple[str, dict]] = [
    ("gpt-2", _BYTE_LEVEL),
    ("smollm", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}),
    ("llama-bpe", {"type": "Sequence", "pretokenizers": [
        _LLAMA3_SPLIT, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
]

ZERO_FFN_WIDTH = 32     # smallest width every quantization type here stores (32-value blocks)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
FILE_TYPE_F16 = 1       # general.file_type: LLAMA_FTYPE_MOSTLY_F16


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    arch: str                       # GGUF architecture written: "llama" or "deci"
    quant: str
    bytes: int
    layers: int                     # blocks in the file (identity layers are not written)
    padded: tuple[str, ...] = ()    # zero sublayers added so llama.cpp builds the model (module docstring)
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensors, as llama.cpp stored them

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        text = (f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, GGUF arch {self.arch}, {self.layers} blocks, "
                f"{self.quant}; tensors: {types})")
        fallback = self.fallback_tensors
        if fallback:
            text += (f"; llama.cpp stored {fallback} of {sum(self.tensor_types.values())} tensors in other types than "
                     f"{self.quant} asks for, because their rows are not a multiple of its block size")
        if self.padded:
            text += f"; zero sublayers added for llama.cpp: {', '.join(self.padded)}"
        return text

    @property
    def fallback_tensors(self) -> int:
        return sum(n for t, n in self.tensor_types.items() if t not in QUANT_INTENDED[self.quant])


# --------------------------------------------------------------------------- checks
def _supported(names) -> str:
    return ", ".join(names)


def check_quant(quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"unknown quantization type {quant!r}; the GGUF writer supports {_supported(QUANT_TYPES)}")
    if QUANT_TYPES[quant] is not None:
        _llama_cpp(quant)


def _llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise GGUFExportError(
            f"--quant {quant} runs llama.cpp's quantizer, which needs llama-cpp-python; install it with "
            f"`pip install llama-cpp-python` (or `pip install 'prunekit[gguf]'`), or export f16"
        ) from None
    return llama_cpp


def gguf_family(model_type: str) -> GGUFFamily:
    """The GGUF table of `model_type` (prunekit_llama counts as llama), or an error listing the supported ones."""
    base = architecture_for(model_type).model_type
    try:
        return GGUF_FAMILIES[base]
    except KeyError:
        raise GGUFExportError(
            f"the GGUF writer does not support model type {model_type!r}; it supports {_supported(GGUF_FAMILIES)} "
            f"(and its pruned forms); keep this model as a Hugging Face directory instead"
        ) from None


def check_config(config) -> GGUFFamily:
    """Everything about the model config that decides whether llama.cpp can run it, before any weight is read."""
    family = gguf_family(config.model_type)
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in family.rope_types:
        raise GGUFExportError(
            f"rope type {rope_type!r} is not written by the GGUF writer; it supports {_supported(family.rope_types)}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("the GGUF writer supports Llama models without attention/MLP biases; this one has biases")
    if getattr(config, "sliding_window", None) and architecture_for(config.model_type).is_moe:
        raise GGUFExportError("llama.cpp's Mixtral graph attends to the whole context; this model has a sliding window "
                              f"of {config.sliding_window}, which the GGUF writer cannot express")
    if config.model_type.removeprefix("prunekit_") == "qwen3_moe" and not getattr(config, "norm_topk_prob", True):
        raise GGUFExportError("llama.cpp's qwen3moe graph always renormalises the top-k gate values; this model has "
                              "norm_topk_prob false, which llama.cpp would compute differently")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"llama.cpp's Llama graph uses SiLU; this model's hidden_act is {config.hidden_act!r}")
    return family


def check_output_file(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> None:
    if out.suffix.lower() != ".gguf":
        raise GGUFExportError(f"output {out} must be a file name ending in .gguf")
    if (overlapped := overlapped_input(out, protected)) is not None:
        raise OutputExistsError(f"output {out} is inside the input model at {overlapped}; write the .gguf elsewhere")
    if out.is_dir():
        raise OutputExistsError(f"output {out} is a directory; name a .gguf file")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose another path or pass --force to replace it")


# --------------------------------------------------------------------------- tokenizer
def _canonical(pre: dict | None) -> dict | None:
    """A pre-tokenizer spec without the fields that only change offsets, never token ids."""
    if pre is None:
        return None
    out = {k: v for k, v in pre.items() if k != "trim_offsets"}
    if "pretokenizers" in out:
        out["pretokenizers"] = [_canonical(p) for p in out["pretokenizers"]]
    return out


def _pre_tokenizer_name(spec: dict) -> str:
    pre = _canonical(spec.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS:
        if pre == known:
            return name
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} has no llama.cpp equivalent in the "
        f"GGUF writer's table (known: {_supported(n for n, _ in PRE_TOKENIZERS)}); add its llama.cpp name to "
        f"PRE_TOKENIZERS in prunekit/export/gguf.py"
    )


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Tokens, types, merges and special ids as llama.cpp's `gpt2` (byte-level BPE) vocabulary reads them."""
    if tokenizer is None:
        raise GGUFExportError("the model has no tokenizer, and a GGUF file must carry one; save the model with its tokenizer")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the GGUF writer needs a fast (tokenizer.json) tokenizer; this one is a slow tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(
            f"the GGUF writer supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3); this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    if spec.get("normalizer") is not None:
        raise GGUFExportError(
            f"the tokenizer normalizes text ({spec['normalizer'].get('type')}) before BPE, which llama.cpp's byte-level "
            f"BPE vocabulary does not do; the GGUF writer supports tokenizers without a normalizer"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFExportError("the tokenizer has no BPE merges, and llama.cpp's BPE vocabulary requires them; the GGUF "
                              "writer supports byte-level BPE tokenizers with merges (SmolLM, Llama 3)")
    pre = _pre_tokenizer_name(spec)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                              f"embeddings; save the model with the tokenizer it was trained with")
    by_id = {i: t for t, i in vocab.items()}
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TOKEN_CONTROL if added[token].special else TOKEN_USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)
    probe = tokenizer.encode("a", add_special_tokens=True)
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


# --------------------------------------------------------------------------- weights
def _rope_parameters(config) -> dict:
    # transformers 5.x keeps rope settings in rope_parameters (rope_theta moved there too).
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotates the two halves of each head; llama.cpp rotates adjacent pairs: reorder rows to match."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency factors of Llama 3.1 rope scaling, as convert_hf_to_gguf.py writes them (rope_freqs)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _array(tensor: torch.Tensor) -> np.ndarray:
    """Matrices as f16, vectors (norms) as f32, as convert_hf_to_gguf.py stores an f16 model."""
    tensor = tensor.detach().to("cpu", torch.float32)
    return tensor.numpy().astype(np.float16 if tensor.ndim >= 2 else np.float32)


@dataclass(frozen=True)
class _Block:
    source: int                 # decoder layer index in the model
    heads: int
    kv_heads: int
    ffn: int
    pad_attention: bool = False
    pad_mlp: bool = False
    experts: int = 0            # routed experts of a MoE layer (ffn is then each expert's width)


def plan_blocks(shapes: tuple[LayerShape, ...]) -> list[_Block]:
    """The GGUF blocks for a model's layers: identity layers dropped, zero sublayers where llama.cpp needs them."""
    blocks = []
    for index, shape in enumerate(shapes):
        heads, kv, ffn = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
        if heads == 0 and ffn == 0:
            continue
        pad_attention = heads == 0 and not blocks
        pad_mlp = heads > 0 and ffn == 0
        blocks.append(_Block(index, 1 if pad_attention else heads, 1 if pad_attention else kv,
                             ZERO_FFN_WIDTH if pad_mlp else ffn, pad_attention, pad_mlp,
                             shape.num_experts if ffn else 0))
    if not blocks:
        raise GGUFExportError("every layer of this model lost both its attention and its MLP; there is nothing to run")
    return blocks


def _is_uniform(blocks: list[_Block]) -> bool:
    first = blocks[0]
    return all((b.heads, b.kv_heads, b.ffn, b.experts) == (first.heads, first.kv_heads, first.ffn, first.experts)
               for b in blocks) and not (
        first.pad_attention or any(b.pad_mlp for b in blocks))


def _tensor_name(gguf, role: str, bid: int | None = None, kind: str = "weight") -> str:
    template = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, role)]
    return (template.format(bid=bid) if bid is not None else template) + "." + kind


def _add_metadata(writer, gguf, config, blocks: list[_Block], uniform: bool, rope: dict, vocab: dict,
                  head_dim: int) -> None:
    writer.add_name(str(getattr(config, "_name_or_path", "") or "prunekit model"))
    writer.add_block_count(len(blocks))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    per_layer = lambda values: values[0] if uniform else values  # noqa: E731
    writer.add_feed_forward_length(per_layer([b.ffn for b in blocks]))
    if blocks[0].experts:  # uniform: every block has them (`_write_f16`)
        writer.add_expert_feed_forward_length(blocks[0].ffn)
        writer.add_expert_count(blocks[0].experts)
        writer.add_expert_used_count(min(config.num_experts_per_tok, blocks[0].experts))
    writer.add_head_count(per_layer([b.heads for b in blocks]))
    writer.add_head_count_kv(per_layer([b.kv_heads for b in blocks]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPE_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


def _add_tensors(writer, gguf, model, blocks: list[_Block], head_dim: int, rope: dict, permute: bool,
                 qk_norms: bool = False) -> None:
    arch = architecture_for(model.config.model_type)
    hidden = model.config.hidden_size
    layers = decoder_layers(model, arch.to_dict())
    writer.add_tensor(_tensor_name(gguf, "TOKEN_EMBD"), _array(model.get_input_embeddings().weight))
    writer.add_tensor(_tensor_name(gguf, "OUTPUT_NORM"), _array(model.get_submodule(arch.final_norm).weight))
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        writer.add_tensor(_tensor_name(gguf, "OUTPUT"), _array(output.weight))
    # (tied embeddings: llama.cpp uses token_embd as the output head when output.weight is absent)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor(_tensor_name(gguf, "ROPE_FREQS"), _llama3_rope_factors(rope, head_dim))
    for bid, block in enumerate(blocks):
        layer = layers[block.source]
        name = lambda role: _tensor_name(gguf, LAYER_TENSORS[role], bid)  # noqa: E731
        if block.pad_attention:
            writer.add_tensor(name("attention_norm"), np.ones(hidden, dtype=np.float32))
            for role, rows in (("q_proj", head_dim), ("k_proj", head_dim), ("v_proj", head_dim)):
                writer.add_tensor(name(role), np.zeros((rows, hidden), dtype=np.float16))
            writer.add_tensor(name("o_proj"), np.zeros((hidden, head_dim), dtype=np.float16))
        elif block.heads:
            attention = getattr(layer, arch.attention)
            writer.add_tensor(name("attention_norm"), _array(getattr(layer, arch.attention_norms[0]).weight))
            q = getattr(attention, arch.q_proj).weight
            k = getattr(attention, arch.k_proj).weight
            if permute:
                q, k = _permute_rope(q, block.heads), _permute_rope(k, block.kv_heads)
            writer.add_tensor(name("q_proj"), _array(q))
            writer.add_tensor(name("k_proj"), _array(k))
            writer.add_tensor(name("v_proj"), _array(getattr(attention, arch.v_proj).weight))
            writer.add_tensor(name("o_proj"), _array(getattr(attention, arch.o_proj).weight))
            if qk_norms:
                writer.add_tensor(_tensor_name(gguf, "ATTN_Q_NORM", bid), _array(attention.q_norm.weight))
                writer.add_tensor(_tensor_name(gguf, "ATTN_K_NORM", bid), _array(attention.k_norm.weight))
        if block.pad_mlp:
            writer.add_tensor(name("mlp_norm"), np.ones(hidden, dtype=np.float32))
            for role, shape in (("gate_proj", (ZERO_FFN_WIDTH, hidden)), ("up_proj", (ZERO_FFN_WIDTH, hidden)),
                                ("down_proj", (hidden, ZERO_FFN_WIDTH))):
                writer.add_tensor(name(role), np.zeros(shape, dtype=np.float16))
        elif block.experts:
            mlp = getattr(layer, arch.mlp)
            router, experts = moe_parts(mlp, arch.to_dict())
            writer.add_tensor(name("mlp_norm"), _array(getattr(layer, arch.mlp_norms[0]).weight))
            writer.add_tensor(_tensor_name(gguf, "FFN_GATE_INP", bid), _array(router.weight))
            # fused [experts, gate rows | up rows, hidden] -> llama.cpp's stacked gate and up experts
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            for role, weight in (("FFN_GATE_EXP", gate), ("FFN_UP_EXP", up), ("FFN_DOWN_EXP", experts.down_proj)):
                writer.add_tensor(_tensor_name(gguf, role, bid), _array(weight))
        elif block.ffn:
            mlp = getattr(layer, arch.mlp)
            writer.add_tensor(name("mlp_norm"), _array(getattr(layer, arch.mlp_norms[0]).weight))
            for role in ("gate_proj", "up_proj", "down_proj"):
                writer.add_tensor(name(role), _array(getattr(mlp, getattr(arch, role)).weight))


# --------------------------------------------------------------------------- files
def _temporary_beside(out: Path, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".{tag}.tmp")
    os.close(fd)
    return Path(tmp)


def _write_f16(model: nn.Module, tokenizer, path: Path) -> tuple[str, list[_Block]]:
    import gguf

    config = model.config
    family = check_config(config)
    structure = model_structure(model)
    blocks = plan_blocks(structure.layers)
    uniform = _is_uniform(blocks)
    arch = family.uniform_arch if uniform else family.per_layer_arch
    if not arch:
        raise GGUFExportError(
            f"llama.cpp builds every layer of a {config.model_type} model with one shape (one expert count), and this "
            f"model's layers differ; prune it with --allocation uniform (and without dropping sublayers) to export it"
        )
    head_dim = head_dim_of(config)
    rope = _rope_parameters(config)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size)
    writer = gguf.GGUFWriter(path, arch)
    try:
        _add_metadata(writer, gguf, config, blocks, uniform, rope, vocab, head_dim)
        with torch.no_grad():
            _add_tensors(writer, gguf, model, blocks, head_dim, rope, family.rope_interleaved, family.qk_norms)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return arch, blocks


def _quantize(source: Path, target: Path, quant: str) -> None:
    llama_cpp = _llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = min(os.cpu_count() or 1, 8)
    # The quantizer writes a line per tensor straight to file descriptor 2 (past llama_log_set), so
    # its log is caught there; the export's summary reports what it chose, and -v shows the log.
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace")
    log.info("llama.cpp quantizer:\n%s", text)
    if status != 0:
        tail = text.strip().splitlines()[-1] if text.strip() else "no message"
        raise GGUFExportError(f"llama.cpp's quantizer failed on {source.name} -> {quant} (status {status}: {tail})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (what llama.cpp's quantizer actually chose)."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def write_gguf(model: nn.Module, tokenizer, out: str | Path, *, quant: str = "f16", force: bool = False,
               protected: tuple[Path, ...] = ()) -> GGUFExport:
    """Write a loaded `model` and its tokenizer to `out` (.gguf), as f16 or quantized by llama.cpp.

    The file appears under its final name only when complete: it is written beside it under a
    temporary name and renamed; an interruption or error removes the temporary files.
    """
    out = Path(out)
    check_quant(quant)
    check_output_file(out, force=force, protected=protected)
    check_config(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary: list[Path] = []
    try:
        f16 = _temporary_beside(out, "f16")
        temporary.append(f16)
        arch, blocks = _write_f16(model, tokenizer, f16)
        final = f16
        if QUANT_TYPES[quant] is not None:
            final = _temporary_beside(out, quant)
            temporary.append(final)
            _quantize(f16, final, quant)
        os.chmod(final, default_mode(directory=False))
        os.replace(final, out)
    except BaseException as error:
        for path in temporary:
            path.unlink(missing_ok=True)
        translated = disk_full(error, out)
        if translated is error:
            raise
        raise translated from None
    for path in temporary:
        path.unlink(missing_ok=True)
    padded = tuple(
        [f"one zero attention head in block {b}" for b, blk in enumerate(blocks) if blk.pad_attention]
        + [f"a zero {ZERO_FFN_WIDTH}-channel FFN in block {b}" for b, blk in enumerate(blocks) if blk.pad_mlp]
    )
    return GGUFExport(out, arch, quant, out.stat().st_size, len(blocks), padded, tensor_types(out))


def load_in_llama_cpp(path: str | Path, *, extra_buffers: bool = True, **kwargs):
    """llama-cpp-python's `Llama` for a GGUF file; with `extra_buffers=False`, on llama.cpp's plain
    CPU kernels (llama_model_params.use_extra_bufts off).

    With extra buffer types on, llama.cpp moves Q8_0/Q4_K weights on a CPU with AMX (Sapphire
    Rapids and later) into its AMX buffer, whose matmul (ggml_backend_amx_mul_mat in llama-cpp-python
    0.3.36's vendored copy, built by gcc 12) loads a tile config the compiler left half-written:
    `ldtilecfg` faults and the process dies with SIGSEGV (llama.cpp issues #20824, #26954). The same
    switch turns off the repacked kernels elsewhere. `Llama()` has no argument for the flag, so its
    default model parameters are patched while it loads."""
    import llama_cpp

    if extra_buffers:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    bindings = llama_cpp.llama_cpp
    defaults = bindings.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        bindings.llama_model_default_params = defaults


def export_gguf(model: str | Path, out: str | Path, *, quant: str = "f16", force: bool = False) -> GGUFExport:
    """Export a model directory (or any model `prunekit.load` reads) as a llama.cpp GGUF file.

        prunekit.export_gguf("runs/pruned35", "pruned35.q4_k_m.gguf", quant="q4_k_m")

    Every option, the family and the output path are checked before the weights are read.
    """
    from prunekit.models.loading import load, load_config, load_tokenizer, resolve_model_source

    check_quant(quant)
    source = resolve_model_source(model)
    check_output_file(Path(out), force=force, protected=source.local_paths)
    config = load_config(source)
    check_config(config)
    tokenizer = load_tokenizer(source)
    tokenizer_metadata(tokenizer, config.vocab_size)  # a tokenizer llama.cpp cannot read fails before the weights load
    loaded, _ = load(model, dtype="float32", with_tokenizer=False)
    return write_gguf(loaded, tokenizer, out, quant=quant, force=force, protected=source.local_paths)


__all__ = ["GGUFExport", "GGUFExportError", "GGUF_FAMILIES", "QUANT_TYPES", "export_gguf", "load_in_llama_cpp",
           "tensor_types", "write_gguf"]
