"""The models the simulator serves, as `weights.DenseDecoder`s (bf16), from their
Hugging Face configs.

Llama-3-8B/70B and Llama-3.1-8B/70B share every shape below; the 3.1 context length
(128K) is assumed so that Mooncake's long prompts are legal. Qwen2.5-32B has QKV biases
and untied embeddings; SGLang 0.5.23 builds Llama's lm_head on every PP stage and
Qwen2's on the last (`DenseDecoder.lm_head_on_every_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

from remp_sglang.topology import ModelShape
from remp_sglang.weights import DenseDecoder


@dataclass(frozen=True)
class SimModel:
    """A decoder and the longest context its checkpoint accepts."""

    name: str
    decoder: DenseDecoder
    context_len: int


LLAMA3_8B = SimModel("Llama-3-8B", DenseDecoder(
    ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, dtype_bytes=2),
    hidden_size=4096, intermediate_size=14336, vocab_size=128256,
    lm_head_on_every_stage=True), context_len=131072)

LLAMA3_70B = SimModel("Llama-3-70B", DenseDecoder(
    ModelShape(num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, dtype_bytes=2),
    hidden_size=8192, intermediate_size=28672, vocab_size=128256,
    lm_head_on_every_stage=True), context_len=131072)

QWEN25_32B = SimModel("Qwen2.5-32B", DenseDecoder(
    ModelShape(num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, dtype_bytes=2),
    hidden_size=5120, intermediate_size=27648, vocab_size=152064, qkv_bias=True),
    context_len=131072)

MODELS = {m.name: m for m in (LLAMA3_8B, LLAMA3_70B, QWEN25_32B)}
