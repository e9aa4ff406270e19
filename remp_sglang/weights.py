"""How SGLang 0.5.23 shards a dense decoder's parameters, as planner segments.

A parameter's "full" tensor is the unsharded one in SGLang's naming (q/k/v merged into
`qkv_proj` as [q | k | v] rows, gate/up into `gate_up_proj` as [gate | up] rows). Each
rank's local tensor is a list of segments of the full tensor along one dimension, which
is all `planner.plan_tensors` needs to re-shard weights between two topologies from the
ranks that hold them, without the checkpoint. Pure Python: no torch, no sglang.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

from .planner import Segment, TensorPlan, plan_tensors
from .topology import ModelShape, Topology, tp_kv_head_range

VOCAB_PADDING = 64  # sglang.srt.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE


class Split(enum.Enum):
    REPLICATED = "replicated"  # every owner holds the whole tensor (norms)
    COLUMN = "column"  # dim 0 split evenly over TP
    ROW = "row"  # dim 1 split evenly over TP (o_proj, down_proj)
    QKV = "qkv"  # merged q|k|v rows; KV heads replicated when tp > KV heads
    GATE_UP = "gate_up"  # merged gate|up rows, each half split over TP
    VOCAB = "vocab"  # dim 0 split over TP after padding the vocabulary to 64


@dataclass(frozen=True)
class DenseDecoder:
    """A Llama/Qwen2-style decoder: the sizes its parameter shapes follow from."""

    shape: ModelShape
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # SGLang 0.5.23's Llama builds (and loads) lm_head on every PP stage, Qwen2 on the last.
    lm_head_on_every_stage: bool = False

    def __post_init__(self) -> None:
        if self.tie_word_embeddings:
            raise ValueError("DenseDecoder.tie_word_embeddings=True is not supported yet")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]  # full shape
    split: Split
    layer: int | None = None  # decoder layer; None for embedding / final norm / lm_head
    stage: str | None = None  # "first", "last" or "every" for non-layer parameters

    @property
    def dim(self) -> int:
        return 1 if self.split is Split.ROW else 0

    def row_elements(self) -> int:
        """Elements per index along the shard dimension."""
        return math.prod(self.shape) // self.shape[self.dim]


def dense_decoder_params(model: DenseDecoder) -> list[ParamSpec]:
    s = model.shape
    H, K, D, inter = s.num_heads, s.num_kv_heads, s.head_dim, model.intermediate_size
    h, qkv_rows = model.hidden_size, (H + 2 * K) * D
    specs = [
        ParamSpec("model.embed_tokens.weight", (model.vocab_size, h), Split.VOCAB, stage="first"),
        ParamSpec("model.norm.weight", (h,), Split.REPLICATED, stage="last"),
        ParamSpec("lm_head.weight", (model.vocab_size, h), Split.VOCAB,
                  stage="every" if model.lm_head_on_every_stage else "last"),
    ]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        specs += [
            ParamSpec(p + "input_layernorm.weight", (h,), Split.REPLICATED, i),
            ParamSpec(p + "post_attention_layernorm.weight", (h,), Split.REPLICATED, i),
            ParamSpec(p + "self_attn.qkv_proj.weight", (qkv_rows, h), Split.QKV, i),
            ParamSpec(p + "self_attn.o_proj.weight", (h, H * D), Split.ROW, i),
            ParamSpec(p + "mlp.gate_up_proj.weight", (2 * inter, h), Split.GATE_UP, i),
            ParamSpec(p + "mlp.down_proj.weight", (h, inter), Split.ROW, i),
        ]
        if model.qkv_bias:
            specs.append(ParamSpec(p + "self_attn.qkv_proj.bias", (qkv_rows,), Split.QKV, i))
    return specs


def owns(spec: ParamSpec, model: DenseDecoder, topo: Topology, rank: int) -> bool:
    if not topo.is_active(rank):
        return False
    pp_rank, _ = topo.coords(rank)
    if spec.layer is not None:
        return spec.layer in topo.layer_range(rank, model.shape.num_layers)
    if spec.stage == "every":
        return True
    return pp_rank == (0 if spec.stage == "first" else topo.pp - 1)


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING


def local_segments(
    spec: ParamSpec, model: DenseDecoder, topo: Topology, rank: int
) -> list[Segment]:
    """Segments of the full tensor that `rank` holds, in local order."""
    _, t = topo.coords(rank)
    tp, s = topo.tp, model.shape
    if spec.split is Split.REPLICATED:
        return [Segment(0, spec.shape[0])]
    if spec.split in (Split.COLUMN, Split.ROW):
        per = spec.shape[spec.dim] // tp
        return [Segment(t * per, (t + 1) * per)]
    if spec.split is Split.GATE_UP:
        inter = spec.shape[0] // 2
        per = inter // tp
        return [
            Segment(t * per, (t + 1) * per, 0),
            Segment(inter + t * per, inter + (t + 1) * per, per),
        ]
    if spec.split is Split.VOCAB:
        per = padded_vocab(spec.shape[0]) // tp
        start = min(t * per, spec.shape[0])
        return [Segment(start, min((t + 1) * per, spec.shape[0]))]
    # QKV
    D, H, K = s.head_dim, s.num_heads, s.num_kv_heads
    q_rows = (H // tp) * D
    kv = tp_kv_head_range(K, t, tp)
    kv_rows = len(kv) * D
    return [
        Segment(t * q_rows, (t + 1) * q_rows, 0),
        Segment(H * D + kv.start * D, H * D + kv.stop * D, q_rows),
        Segment((H + K) * D + kv.start * D, (H + K) * D + kv.stop * D, q_rows + kv_rows),
    ]


def local_shape(spec: ParamSpec, model: DenseDecoder, topo: Topology, rank: int) -> tuple[int, ...]:
    """Shape of the rank's local tensor (VOCAB shards include their zero padding rows)."""
    if spec.split is Split.VOCAB:
        rows = padded_vocab(spec.shape[0]) // topo.tp
    else:
        rows = sum(seg.length for seg in local_segments(spec, model, topo, rank))
    shape = list(spec.shape)
    shape[spec.dim] = rows
    return tuple(shape)


def layout(model: DenseDecoder, topo: Topology) -> dict[str, dict[int, list[Segment]]]:
    out: dict[str, dict[int, list[Segment]]] = {}
    for spec in dense_decoder_params(model):
        out[spec.name] = {
            r: local_segments(spec, model, topo, r)
            for r in topo.active_ranks
            if owns(spec, model, topo, r)
        }
    return out


@functools.lru_cache(maxsize=64)
def plan_weights(old: Topology, new: Topology, model: DenseDecoder) -> TensorPlan:
    """Which slices of every parameter each new rank needs, and from which old rank.
    Cached (a reshape, its dry run and its report ask for the same plan; a server moves
    among few layouts): the plan is read, never changed."""
    old.check_model(model.shape)
    new.check_model(model.shape)
    row_bytes = {
        sp.name: sp.row_elements() * model.shape.dtype_bytes for sp in dense_decoder_params(model)
    }
    return plan_tensors(layout(model, old), layout(model, new), row_bytes)
