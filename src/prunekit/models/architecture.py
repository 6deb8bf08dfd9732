"""What prunekit knows about a model family: module names and config keys, as data.

A family is one `Architecture` value in its own file (llama.py, gemma2.py, ...) registered with
`register`. Everything that prunes, inspects or saves a model reads these tables; nothing else
in prunekit names a module of a specific family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prunekit.errors import PrunekitError


class UnsupportedModelError(PrunekitError, ValueError):
    """The model's family has no architecture table."""


@dataclass(frozen=True)
class Architecture:
    """Module names and quirks of one model family (all names relative to a decoder layer).

    Attention either has separate `q_proj`/`k_proj`/`v_proj` or one fused `qkv_proj` whose
    output rows are [queries | keys | values]; the MLP either has `gate_proj`/`up_proj` or one
    fused `gate_up_proj` whose rows are [gate | up].
    """

    model_type: str                        # config.model_type
    layers: str = "model.layers"           # the ModuleList of decoder layers, from the CausalLM
    attention: str = "self_attn"
    mlp: str = "mlp"
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None            # fused q/k/v (Phi-3)
    o_proj: str = "o_proj"
    gate_proj: str | None = "gate_proj"
    up_proj: str | None = "up_proj"
    gate_up_proj: str | None = None        # fused gate/up (Phi-3)
    down_proj: str = "down_proj"
    # Norms that belong to a sublayer: removed (replaced by identity) together with it.
    attention_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # A norm applied to a sublayer's output before the residual add (Gemma's sandwich norms):
    # what the sublayer adds to the residual stream is that norm's output.
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    final_norm: str = "model.norm"         # applied after the last layer, before the output head
    # Attention reads config.num_attention_heads at run time (Phi-3 splits its fused qkv that
    # way), so a layer whose head count differs from the config's needs a config of its own.
    attention_reads_config: bool = False
    # transformers' config class rejects hidden_size % num_attention_heads != 0 even when
    # head_dim is explicit (Llama, Gemma 2/3 in transformers 5.x).
    config_requires_heads_divide_hidden: bool = False
    # Hidden-size pruning folds sqrt(d / d') into every norm over the residual stream: a norm that
    # multiplies by (offset + weight) (Gemma: 1 + weight) needs the offset to do it.
    norm_weight_offset: float = 0.0
    # A buffer of the input embedding that holds sqrt(hidden_size) (Gemma scales embeddings by
    # it); hidden-size pruning sets it to the new size's value and rescales the embedding.
    embedding_scale: str | None = None
    # Mixture of experts (names relative to the MLP module, which is then the sparse block): the
    # router whose weight has one row per expert, and the experts as fused 3-D parameters
    # (transformers 5.x: gate_up_proj [experts, 2 x width, hidden], down_proj [experts, hidden,
    # width]). A layer is a MoE layer when its MLP has the experts module (Qwen-MoE families mix
    # in dense layers). Config keys: the expert count, each expert's FFN width, and top-k.
    router: str | None = None
    experts: str | None = None
    num_experts_key: str | None = None
    expert_width_key: str = "intermediate_size"
    top_k_key: str = "num_experts_per_tok"
    # An always-on expert beside the routed ones (Qwen2-MoE), scaled by sigmoid(shared_expert_gate):
    # a dense gated MLP with the family's gate/up/down names, as wide as config[shared_expert_width_key].
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_expert_width_key: str | None = None
    # q/k norms over all heads at once (OLMoE), not per head: head pruning would change the kept
    # heads' outputs, so surgery refuses it.
    attention_norms_span_heads: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURES: dict[str, Architecture] = {}

NEW_FAMILY_HINT = (
    "To add a family, write src/prunekit/models/<family>.py with its Architecture table "
    "(copy llama.py) and import it in src/prunekit/models/__init__.py."
)


def register(arch: Architecture) -> Architecture:
    """Add a family's table; checks that it names a complete attention and MLP."""
    if arch.model_type in ARCHITECTURES:
        raise ValueError(f"architecture {arch.model_type!r} is registered twice")
    separate_qkv = arch.q_proj and arch.k_proj and arch.v_proj
    if bool(separate_qkv) == bool(arch.qkv_proj):
        raise ValueError(f"{arch.model_type}: name either q_proj/k_proj/v_proj or qkv_proj, not both or neither")
    if bool(arch.gate_proj and arch.up_proj) == bool(arch.gate_up_proj):
        raise ValueError(f"{arch.model_type}: name either gate_proj/up_proj or gate_up_proj, not both or neither")
    if bool(arch.router) != bool(arch.experts) or bool(arch.experts) != bool(arch.num_experts_key):
        raise ValueError(f"{arch.model_type}: a mixture of experts names router, experts and num_experts_key together")
    ARCHITECTURES[arch.model_type] = arch
    return arch


def architecture_for(model_type: str) -> Architecture:
    """The table of `model_type`, or an error that lists the supported families."""
    base = model_type.removeprefix("prunekit_")
    try:
        return ARCHITECTURES[base]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"prunekit does not support model type {model_type!r}; supported: {supported}. {NEW_FAMILY_HINT}"
        ) from None
