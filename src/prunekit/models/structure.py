"""The prunable structure of a model: per layer, its heads, KV groups and FFN channels, with
parameters and FLOPs per token. Read from the modules themselves, so it is true for pruned
models as much as for stock ones."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from torch import nn

from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers, head_dim_of, moe_parts


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer; 0 heads means no attention sublayer, 0 channels no MLP.
    In a MoE layer `intermediate_size` is each routed expert's width and `num_experts` their count
    (0: a dense MLP); `shared_expert_size` is the width of its shared expert (Qwen2-MoE; 0: none).
    A layer whose MLP is gone has intermediate_size 0 and no shared expert."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_experts: int = 0
    shared_expert_size: int = 0

    @property
    def dense_ffn_width(self) -> int:
        """The units of the dense `channel` structure: a dense layer's FFN channels, a MoE layer's
        shared expert's (0 for a MoE layer without one)."""
        return self.shared_expert_size if self.num_experts else self.intermediate_size

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads if self.num_key_value_heads else 0

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.num_experts:  # dense layers read as they always have
            del out["num_experts"]
        if not self.shared_expert_size:  # so do MoE layers without a shared expert
            del out["shared_expert_size"]
        return out

    def attention_part(self) -> LayerShape:
        """This layer's attention alone (what its attention costs, with LayerCosts.params)."""
        return LayerShape(self.num_attention_heads, self.num_key_value_heads, 0)

    def mlp_part(self) -> LayerShape:
        """This layer's MLP alone: routed experts, their widths and the shared expert."""
        return replace(self, num_attention_heads=0, num_key_value_heads=0)


@dataclass(frozen=True)
class LayerCosts:
    """Parameters of one layer, split so that any narrower shape can be costed exactly."""

    attention_fixed: int   # attention params that do not scale with heads: its norms, o_proj bias, q/k norms
    per_query_head: int    # one query head: its q rows (and bias) plus its o_proj columns
    per_kv_group: int      # one KV group: its k and v rows (and biases)
    mlp_fixed: int         # MLP params that do not scale with channels: its norms, down_proj bias
    per_channel: int       # one FFN channel: its gate and up rows (and biases) plus its down_proj column
    other: int             # params of the layer outside both sublayers
    # How the counts above grow with one residual channel (hidden pruning): vectors of hidden size
    # in attention_fixed / mlp_fixed (norm weights, o_proj / down_proj biases); a query head or KV
    # group reads and writes head_dim weights per channel, an FFN channel three (gate, up, down).
    attention_hidden_vectors: int = 0
    mlp_hidden_vectors: int = 0
    head_dim: int = 0
    # A MoE layer: one routed expert's router row (and bias), one channel of one expert (its
    # gate and up rows and down column), and one channel of the shared expert (the same, with
    # biases if it has them). mlp_fixed holds the shared expert's gate.
    per_expert: int = 0
    per_expert_channel: int = 0
    per_shared_channel: int = 0

    def at_hidden_size(self, old: int, new: int) -> LayerCosts:
        """These costs for a model whose residual stream has `new` channels instead of `old`."""
        delta = new - old
        return replace(
            self,
            attention_fixed=self.attention_fixed + self.attention_hidden_vectors * delta,
            per_query_head=self.per_query_head + 2 * self.head_dim * delta,
            per_kv_group=self.per_kv_group + 2 * self.head_dim * delta,
            mlp_fixed=self.mlp_fixed + self.mlp_hidden_vectors * delta,
            per_channel=self.per_channel + 3 * delta if self.per_channel else 0,
            per_expert=self.per_expert + delta if self.per_expert else 0,
            per_expert_channel=self.per_expert_channel + 3 * delta if self.per_expert_channel else 0,
            per_shared_channel=self.per_shared_channel + 3 * delta if self.per_shared_channel else 0,
        )

    def params(self, shape: LayerShape) -> int:
        attention = (
            self.attention_fixed + shape.num_attention_heads * self.per_query_head + shape.num_key_value_heads * self.per_kv_group
            if shape.num_attention_heads else 0
        )
        mlp = (self.mlp_fixed + shape.intermediate_size * self.per_channel
               + shape.num_experts * (self.per_expert + shape.intermediate_size * self.per_expert_channel)
               + shape.shared_expert_size * self.per_shared_channel
               if shape.intermediate_size else 0)
        return attention + mlp + self.other

    def active_params(self, shape: LayerShape, experts_per_token: int) -> int:
        """The parameters one token runs through: all of them, but only the top-k routed experts
        of a MoE layer (the router still scores every expert; the shared expert runs for every token)."""
        idle = max(shape.num_experts - min(experts_per_token, shape.num_experts), 0)
        return self.params(shape) - (idle * shape.intermediate_size * self.per_expert_channel if shape.intermediate_size else 0)


@dataclass(frozen=True)
class ModelStructure:
    model_type: str                # the family (prunekit_llama counts as llama)
    hidden_size: int
    head_dim: int
    vocab_size: int
    layers: tuple[LayerShape, ...]
    layer_costs: tuple[LayerCosts, ...]
    embedding_params: int          # input embedding, plus the output head when it is not tied
    other_params: int              # final norm and anything outside the layers
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    other_hidden_vectors: int = 0  # vectors of hidden size in other_params (the final norm)
    experts_per_token: int = 0     # top-k of MoE layers (a layer with fewer experts routes to all it has)

    def at_hidden_size(self, hidden: int) -> ModelStructure:
        """This structure with `hidden` residual channels: the embedding, the output head, every
        norm and every projection that reads or writes the residual stream shrink; head_dim and
        the KV cache do not."""
        if hidden == self.hidden_size:
            return self
        old = self.hidden_size
        return replace(
            self,
            hidden_size=hidden,
            layer_costs=tuple(c.at_hidden_size(old, hidden) for c in self.layer_costs),
            embedding_params=self.embedding_params // old * hidden,
            other_params=self.other_params + self.other_hidden_vectors * (hidden - old),
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_params(self, index: int) -> int:
        return self.layer_costs[index].params(self.layers[index])

    @property
    def non_embedding_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.num_layers)) + self.other_params

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    def layer_flops(self, index: int, attended: float, shape: LayerShape | None = None) -> float:
        """Forward FLOPs of layer `index` (at `shape`, default its own) for one token that attends to
        `attended` earlier positions: 2 per weight of its matrix products, plus 4 * heads * head_dim
        per attended position (scores and weighted values), at most the sliding window on sliding
        layers. This is the one cost model: the planner, `inspect`, the speed ideal and the reports use it."""
        shape = self.layers[index] if shape is None else shape
        if self.sliding_window and self.layer_types and self.layer_types[index] == "sliding_attention":
            attended = min(attended, self.sliding_window)
        # norms and biases are a rounding error next to the matrix products
        return (2 * self.layer_costs[index].active_params(shape, self.experts_per_token)
                + 4 * shape.num_attention_heads * self.head_dim * attended)

    def layer_flops_per_token(self, index: int, seq_len: int = 2048, shape: LayerShape | None = None) -> float:
        """layer_flops averaged over a causal sequence of `seq_len` tokens ((seq_len + 1) / 2 attended)."""
        return self.layer_flops(index, (seq_len + 1) / 2, shape)

    @property
    def output_head_flops(self) -> int:
        return 2 * self.vocab_size * self.hidden_size

    def flops_per_token(self, seq_len: int = 2048) -> int:
        """Forward FLOPs per token averaged over a causal sequence of `seq_len` tokens: every layer's
        `layer_flops_per_token` plus the output head."""
        return int(self.output_head_flops + sum(self.layer_flops_per_token(i, seq_len) for i in range(self.num_layers)))

    def flops_at_context(self, attended: float) -> float:
        """Forward FLOPs of one token that attends to `attended` positions (a decoding step)."""
        return self.output_head_flops + sum(self.layer_flops(i, attended) for i in range(self.num_layers))

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return sum(2 * s.num_key_value_heads * self.head_dim * bytes_per_value for s in self.layers if s.num_attention_heads)

    def is_uniform(self) -> bool:
        """Every layer has the same shape and keeps both sublayers (MoE layers are compared with
        MoE layers and dense ones with dense ones: Qwen-MoE mixes them in stock models)."""
        first = self.layers[0]
        firsts = {bool(s.num_experts): s for s in reversed(self.layers)}
        same_attention = all((s.num_attention_heads, s.num_key_value_heads) == (first.num_attention_heads, first.num_key_value_heads)
                             for s in firsts.values())
        return (all(s == firsts[bool(s.num_experts)] for s in self.layers) and same_attention
                and first.num_attention_heads > 0 and all(s.intermediate_size > 0 for s in firsts.values()))

    def to_dict(self, seq_len: int = 2048) -> dict:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "params": {"total": self.total_params, "non_embedding": self.non_embedding_params,
                       "embedding": self.embedding_params},
            "flops_per_token": self.flops_per_token(seq_len),
            "flops_seq_len": seq_len,
            "kv_cache_bytes_per_token_bf16": self.kv_cache_bytes_per_token(2),
            "layers": [
                {
                    "index": i,
                    **shape.to_dict(),
                    "heads_per_group": shape.heads_per_group,
                    "layer_type": self.layer_types[i] if self.layer_types else None,
                    "params": self.layer_params(i),
                    "attention_params": self.layer_costs[i].params(shape.attention_part()) - self.layer_costs[i].other,
                    "mlp_params": self.layer_costs[i].params(shape.mlp_part()) - self.layer_costs[i].other,
                }
                for i, shape in enumerate(self.layers)
            ],
        }


def format_count(count: float, digits: int = 1) -> str:
    """A parameter or FLOP count for people: 1.2B, 97.3M, 4.1K, 12."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.{digits}f}{unit}"
    return f"{count:.0f}"


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias_size(linear: nn.Linear) -> int:
    return 1 if linear.bias is not None else 0


def _ffn_costs(mlp: nn.Module, arch: Architecture, hidden: int) -> tuple[int, int, int]:
    """A gated dense FFN (a dense layer's MLP, or a shared expert): its width, the parameters of one
    channel (its gate and up rows with their biases, its down column) and its vectors of hidden size
    that do not scale with the width (down's bias)."""
    down = getattr(mlp, arch.down_proj)
    up = getattr(mlp, arch.gate_up_proj or arch.up_proj)
    return down.in_features, 2 * (hidden + _bias_size(up)) + hidden, _bias_size(down)


def _layer_shape_and_costs(layer: nn.Module, arch: Architecture, hidden: int, head_dim: int) -> tuple[LayerShape, LayerCosts]:
    attention = getattr(layer, arch.attention)
    mlp = getattr(layer, arch.mlp)
    attention_vectors = sum(_params(getattr(layer, n)) for n in arch.attention_norms) // hidden
    mlp_vectors = sum(_params(getattr(layer, n)) for n in arch.mlp_norms) // hidden
    attention_total = _params(attention) + sum(_params(getattr(layer, n)) for n in arch.attention_norms)
    mlp_total = _params(mlp) + sum(_params(getattr(layer, n)) for n in arch.mlp_norms)
    other = _params(layer) - attention_total - mlp_total

    heads = kv_heads = 0
    per_query_head = per_kv_group = 0
    if not isinstance(attention, RemovedAttention):
        o_proj = getattr(attention, arch.o_proj)
        heads = o_proj.in_features // head_dim
        if arch.qkv_proj:
            qkv = getattr(attention, arch.qkv_proj)
            kv_heads = (qkv.out_features // head_dim - heads) // 2
            q_bias = kv_bias = _bias_size(qkv)
        else:
            kv_heads = getattr(attention, arch.k_proj).out_features // head_dim
            q_bias = _bias_size(getattr(attention, arch.q_proj))
            kv_bias = _bias_size(getattr(attention, arch.k_proj))
        per_query_head = head_dim * (hidden + q_bias) + head_dim * hidden
        per_kv_group = 2 * head_dim * (hidden + kv_bias)
        attention_vectors += _bias_size(o_proj)
    ffn = per_channel = num_experts = per_expert = per_expert_channel = shared = per_shared_channel = 0
    moe = moe_parts(mlp, arch.to_dict())
    if moe is not None:
        router, experts = moe
        num_experts, ffn = experts.down_proj.shape[0], experts.down_proj.shape[2]
        per_expert = hidden + (1 if getattr(router, "bias", None) is not None else 0)
        per_expert_channel = 3 * hidden
        if arch.shared_expert:  # a dense MLP every token runs: its channels are costed like a dense FFN's
            shared, per_shared_channel, bias_vectors = _ffn_costs(getattr(mlp, arch.shared_expert), arch, hidden)
            mlp_vectors += bias_vectors
        if arch.shared_expert_gate:  # reads the stream
            mlp_vectors += _params(getattr(mlp, arch.shared_expert_gate)) // hidden
    elif not isinstance(mlp, RemovedMLP):
        ffn, per_channel, bias_vectors = _ffn_costs(mlp, arch, hidden)
        mlp_vectors += bias_vectors
    shape = LayerShape(heads, kv_heads, ffn, num_experts, shared)
    costs = LayerCosts(
        attention_fixed=attention_total - heads * per_query_head - kv_heads * per_kv_group if heads else attention_total,
        per_query_head=per_query_head,
        per_kv_group=per_kv_group,
        mlp_fixed=(mlp_total - ffn * per_channel - num_experts * (per_expert + ffn * per_expert_channel)
                   - shared * per_shared_channel) if ffn else mlp_total,
        per_channel=per_channel,
        other=other,
        attention_hidden_vectors=attention_vectors if heads else 0,
        mlp_hidden_vectors=mlp_vectors if ffn else 0,
        head_dim=head_dim,
        per_expert=per_expert,
        per_expert_channel=per_expert_channel,
        per_shared_channel=per_shared_channel,
    )
    return shape, costs


def model_structure(model: nn.Module) -> ModelStructure:
    """Read the per-layer structure of a causal LM of a supported family."""
    config = model.config
    arch = architecture_for(config.model_type)
    hidden, head_dim = model.get_input_embeddings().weight.shape[1], head_dim_of(config)
    layers = decoder_layers(model, arch.to_dict())
    shapes, costs = zip(*(_layer_shape_and_costs(layer, arch, hidden, head_dim) for layer in layers))
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    embedding_params = _params(input_embeddings)
    if output_embeddings is not None and output_embeddings.weight is not input_embeddings.weight:
        embedding_params += _params(output_embeddings)
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied matrix once
    layer_types = getattr(config, "layer_types", None)
    final_norm = model.get_submodule(arch.final_norm)
    return ModelStructure(
        model_type=arch.model_type,
        hidden_size=hidden,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        layers=tuple(shapes),
        layer_costs=tuple(costs),
        embedding_params=embedding_params,
        other_params=total - embedding_params - sum(_params(layer) for layer in layers),
        layer_types=tuple(layer_types) if layer_types else None,
        sliding_window=getattr(config, "sliding_window", None),
        other_hidden_vectors=_params(final_norm) // hidden,
        experts_per_token=getattr(config, arch.top_k_key, 0) if arch.is_moe else 0,
    )
