"""How long one scheduler step takes on a (dp, tp, pp) layout: the performance model the
policy ranks layouts by and the simulator advances its clock by.

One formula for every device; a `Hardware` record holds the numbers (datasheet figures
for GPUs, figures fitted to measured step times on CPU, `bench/step_model.py`). The
slowest pipeline stage sets the pace: the last one, with SGLang's extra layers
(`ceil(layers / pp)`) and the LM head (logits for every decoded token, for one position
of a prefill). On each of its `tp` devices it costs the larger of its FLOPs over the
device's FLOP rate and its bytes (weight shard, KV read) over its memory bandwidth, plus
two all-reduces per layer when tp > 1. A replica's step adds the host's fixed cost
per step. Pipeline stages run micro-batches side by side, so a decode period (every
running request gains one token) is `pp` stage steps of `batch / pp` requests, plus the
hand-offs between stages; with fewer requests than stages, the bubbles stay.

Pure: no torch, no sglang.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .topology import Topology
from .weights import DenseDecoder


@dataclass(frozen=True)
class Hardware:
    """One device and its links, as the model needs them."""

    name: str
    flops: float  # dense FLOP/s one device sustains
    mem_bw: float  # bytes/s one device reads its memory at
    link_bw: float  # bytes/s one way per device, to another device
    link_latency_s: float  # fixed cost of one collective or point-to-point send
    step_overhead_s: float  # host cost of one scheduler step (batching, launch, sampling)
    memory_bytes: float = 0.0  # per device (the simulator's KV capacity); 0: not modelled


@dataclass(frozen=True)
class StepModel:
    """Step times of `model` on `hw` (`dtype_bytes` per weight, from the model's shape)."""

    model: DenseDecoder
    hw: Hardware

    @property
    def _layer_params(self) -> int:
        m, s = self.model, self.model.shape
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * \
            m.intermediate_size

    @property
    def kv_bytes_per_token(self) -> int:
        s = self.model.shape
        return s.num_layers * s.num_kv_heads * s.kv_bytes_per_token_per_layer_head

    def stage_time(self, topo: Topology, tokens: float, attn_pairs: float,
                   context: float, logits: float | None = None) -> float:
        """The slowest stage's forward on each of its tp devices: `tokens` new tokens,
        `attn_pairs` (query, key) pairs of attention, `context` cached tokens read,
        `logits` positions through the LM head (default: every token)."""
        s, hw, m = self.model.shape, self.hw, self.model
        layers = math.ceil(s.num_layers / topo.pp)
        dtype = s.dtype_bytes
        head = m.vocab_size * m.hidden_size
        params = self._layer_params * layers + head
        flops = (2 * self._layer_params * layers * tokens
                 + 2 * head * (tokens if logits is None else logits)
                 + 4 * attn_pairs * s.num_heads * s.head_dim * layers) / topo.tp
        kv_heads = max(1, s.num_kv_heads // topo.tp)
        kv_read = context * layers * kv_heads * s.kv_bytes_per_token_per_layer_head
        compute = max(flops / hw.flops, (params * dtype / topo.tp + kv_read) / hw.mem_bw)
        if topo.tp == 1:
            return compute
        payload = tokens * m.hidden_size * dtype * 2 * (topo.tp - 1) / topo.tp
        return compute + 2 * layers * (hw.link_latency_s + payload / hw.link_bw)

    def _handoff(self, topo: Topology, tokens: float) -> float:
        if topo.pp == 1:
            return 0.0
        return self.hw.link_latency_s + tokens * self.model.hidden_size * \
            self.model.shape.dtype_bytes / self.hw.link_bw

    def decode_period(self, topo: Topology, batch: int, context: float) -> float:
        """Seconds for each of `batch` decoding requests of one replica (holding `context`
        cached tokens in all) to gain one token."""
        if batch < 1:
            return 0.0
        micro = math.ceil(batch / topo.pp) if batch >= topo.pp else batch
        share = micro / batch
        stage = self.stage_time(topo, micro, context * share, context * share)
        return topo.pp * (self.hw.step_overhead_s + stage + self._handoff(topo, micro))

    def prefill_time(self, topo: Topology, tokens: int, cached: int = 0) -> float:
        """Seconds a prefill of `tokens` new tokens after `cached` ones occupies each stage
        of one replica (the other stages serve other micro-batches meanwhile; its latency
        is `pp` times as long)."""
        if tokens < 1:
            return 0.0
        pairs = tokens * cached + tokens * (tokens + 1) / 2
        stage = self.stage_time(topo, tokens, pairs, cached, logits=1)
        return self.hw.step_overhead_s + stage + self._handoff(topo, tokens)

    def prefill_latency(self, topo: Topology, tokens: int, cached: int = 0) -> float:
        """Seconds until a prefill's first token: through every stage in turn."""
        if tokens < 1:
            return 0.0
        pairs = tokens * cached + tokens * (tokens + 1) / 2
        stage = self.stage_time(topo, tokens, pairs, cached, logits=1)
        return topo.pp * (self.hw.step_overhead_s + stage) + \
            (topo.pp - 1) * self._handoff(topo, tokens)
