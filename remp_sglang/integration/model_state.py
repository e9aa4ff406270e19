"""The bridge between a live SGLang model and the engine's view of its weights.

- `decoder_of` describes the model as a `weights.DenseDecoder` (shapes from its HF config).
- `local_params` takes this rank's parameter shards out of the running model and checks them
  against the layout the planner assumes, so a model SGLang shards differently is refused
  before anything moves.
- `weights_from_memory` makes SGLang's loader fill a freshly built model from re-sharded
  tensors instead of the checkpoint (an AROUND hook on `DefaultModelLoader.load_weights_only`).
  While it is active the model is built without parameter memory: each parameter SGLang
  creates is put on the meta device at once (its empty allocation freed), so the build
  never holds a second weight set beside the re-sharded one.
- `pool_from_memory` likewise makes SGLang's KV pool around the per-layer tensors the
  engine filled, instead of allocating its own.
- `build_skeleton` makes a world's model ahead of a reshape (parameters on meta); a
  rebuild given one (`weights_from_memory(model=)`) adopts the shards into it instead
  of constructing the model in the pause; `to_meta` turns a model a reshape left back
  into one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from remp_sglang.topology import ModelShape, Topology
from remp_sglang.weights import DenseDecoder, dense_decoder_params, local_shape, owns

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

_pending_shards: Mapping[str, torch.Tensor] | None = None
_pending_tokenizer: Any = None  # the tokenizer a rebuilt worker takes
_pending_model: torch.nn.Module | None = None  # the skeleton a rebuilt worker takes


def decoder_of(hf_config: Any, dtype: torch.dtype) -> DenseDecoder:
    """The DenseDecoder of a Llama/Qwen2-style HF config; ValueError if unsupported."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"remp supports {SUPPORTED_ARCHITECTURES}, not {archs}")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError("remp does not support tied word embeddings yet")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    shape = ModelShape(
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        dtype_bytes=dtype.itemsize,
    )
    return DenseDecoder(
        shape,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        qkv_bias="Qwen2" in "".join(archs),
        lm_head_on_every_stage=not any("Qwen2" in a for a in archs),
    )


def expected_shapes(decoder: DenseDecoder, topo: Topology,
                    rank: int) -> dict[str, tuple[int, ...]]:
    """This rank's parameter shapes under `topo`, by SGLang parameter name."""
    return {spec.name: local_shape(spec, decoder, topo, rank)
            for spec in dense_decoder_params(decoder) if owns(spec, decoder, topo, rank)}


def local_params(
    model: torch.nn.Module, decoder: DenseDecoder, topo: Topology, rank: int
) -> dict[str, torch.Tensor]:
    """This rank's shards, by SGLang parameter name, checked against the planner's layout:
    the parameters themselves (a reshape releases each in place once it has moved)."""
    params = dict(model.named_parameters())
    expected = expected_shapes(decoder, topo, rank)
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise ValueError(f"model parameters differ from the remp layout: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{name}: SGLang holds {list(params[name].shape)} on rank {rank}, "
                             f"the remp layout says {list(shape)}")
    return params


def to_meta(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]],
            dtype: torch.dtype) -> torch.nn.Module:
    """`model` (its parameters released by a reshape) as a skeleton: each parameter on
    the meta device with its shape under the layout it was built for; same objects."""
    for name, param in model.named_parameters():
        adopt(param, torch.empty(shapes[name], dtype=dtype, device="meta"))
    return model


@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    """Every parameter created meanwhile is put on the meta device at once (its empty
    allocation freed)."""
    original = torch.nn.Parameter.__new__

    def on_meta(cls, data=None, requires_grad=True):
        if data is not None and data.device.type != "meta":
            data = torch.empty_like(data, device="meta")  # the allocation is freed here
        return original(cls, data, requires_grad)

    torch.nn.Parameter.__new__ = on_meta
    try:
        yield
    finally:
        torch.nn.Parameter.__new__ = original


def build_skeleton(model_config: Any, load_config: Any, device: str) -> torch.nn.Module:
    """SGLang's model for the live world, constructed as its default loader does (dtype,
    device, quantization config) with every parameter on meta: no parameter memory,
    its buffers (rotary tables) on `device`."""
    from sglang.srt.model_loader.loader import (
        _get_quantization_config,
        _initialize_model,
        set_default_torch_dtype,
    )

    quant_config = _get_quantization_config(model_config, load_config)
    with set_default_torch_dtype(model_config.dtype), torch.device(device), \
            _meta_parameters():
        return _initialize_model(model_config, load_config, quant_config).eval()


@contextlib.contextmanager
def weights_from_memory(shards: Mapping[str, torch.Tensor], tokenizer: Any = None,
                        model: torch.nn.Module | None = None) -> Iterator[None]:
    """While active, a model SGLang builds takes its parameters from `shards`, and the
    parameters it creates hold no memory until then (meta device); its worker takes
    `tokenizer` (the scheduler's, loaded by the same call) instead of loading one, and
    `model` (a skeleton for this world) instead of constructing the model."""
    global _pending_shards, _pending_tokenizer, _pending_model
    _pending_shards, _pending_tokenizer, _pending_model = shards, tokenizer, model
    try:
        with _meta_parameters():
            yield
    finally:
        _pending_shards = _pending_tokenizer = _pending_model = None


@contextlib.contextmanager
def pool_from_memory(kv: Any) -> Iterator[None]:
    """While active, an `MHATokenToKVPool` SGLang builds takes `kv`'s per-layer K and V
    tensors (the engine's, already filled) instead of allocating its buffers."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    original = MHATokenToKVPool._create_buffers_normal

    def adopt_buffers(pool: Any) -> None:
        expected = (pool.size + pool.page_size, pool.head_num, pool.head_dim)
        if len(kv.k) != pool.layer_num or any(
                tuple(t.shape) != expected or t.dtype != pool.store_dtype
                for t in kv.k + kv.v):
            raise ValueError(f"the moved KV does not match the pool: {pool.layer_num} "
                             f"layers of {list(expected)} {pool.store_dtype} expected")
        pool.k_buffer, pool.v_buffer = list(kv.k), list(kv.v)

    MHATokenToKVPool._create_buffers_normal = adopt_buffers
    try:
        yield
    finally:
        MHATokenToKVPool._create_buffers_normal = original


def adopt(param: torch.nn.Parameter, shard: torch.Tensor) -> None:
    """`param` (on meta) becomes `shard` in place: same object, class and attributes (the
    model's modules keep referring to it), the engine's storage (no copy)."""
    attrs = dict(vars(param))
    real = torch.Tensor._make_subclass(type(param), shard, param.requires_grad)
    torch.utils.swap_tensors(param, real)
    vars(param).update(attrs)


def around_measure_pre_model_load_memory(original, *, device, is_draft_worker):
    """AROUND hook on SGLang's `bootstrap.measure_pre_model_load_memory`. At launch it
    takes the minimum free memory over the world (a collective over its CPU group), to
    size the KV pool. A rebuilt model gets the pool the reshape sized, so that collective
    is not needed; and as the one collective of a model build, it is where a rank would
    wait for a peer that failed before building: in a kept world, with SGLang's 2-hour
    group timeout. The local reading is returned instead."""
    if _pending_shards is None:
        return original(device=device, is_draft_worker=is_draft_worker)
    from sglang.srt.runtime_context import get_device
    from sglang.srt.utils.common import get_available_gpu_memory

    return get_available_gpu_memory(device, get_device().gpu_id)


def around_dist_barrier_after_load(original, **kwargs):
    """AROUND hook on SGLang's barrier after a model load (its model runner's name for
    it): a rebuilt model skips it. Every rank's build is confirmed by the reshape's own
    agreement instead, which a failed peer answers at once; in a kept world the barrier
    would wait for that peer until SGLang's model-loading timeout."""
    if _pending_shards is None:
        return original(**kwargs)
    return None


def around_get_tokenizer(original, *args, **kwargs):
    """AROUND hook on `get_tokenizer` as SGLang's model worker calls it: a rebuilt worker
    takes the scheduler's tokenizer (the same call's result) rather than loading it from
    disk again, which was half of a rebuild's time on the tiny model."""
    if _pending_shards is None or _pending_tokenizer is None:
        return original(*args, **kwargs)
    return _pending_tokenizer


def around_broadcast_pyobj(original, data, rank, dist_group=None, src=0, **kwargs):
    """AROUND hook on `broadcast_pyobj` as SGLang's model worker calls it (to share the
    random seed of the replica's first rank): a rebuilt worker keeps its own, which is
    the same on every rank (one launch's server arguments), so its build runs no
    collective a failed peer could leave waiting."""
    if _pending_shards is None:
        return original(data, rank, dist_group, src=src, **kwargs)
    return data


def around_initialize_model(original, model_config, load_config, quant_config=None):
    """AROUND hook on SGLang's loader `_initialize_model`: a rebuild given a skeleton
    takes it (once) instead of constructing the model."""
    global _pending_model
    if _pending_model is None:  # set only inside `weights_from_memory`, with the shards
        return original(model_config, load_config, quant_config)
    model, _pending_model = _pending_model, None
    return model


def around_load_weights_only(original, model, weights, target_device):
    """AROUND hook on DefaultModelLoader.load_weights_only (a staticmethod)."""
    if _pending_shards is None:
        return original(model, weights, target_device)
    params = dict(model.named_parameters())
    if set(params) != set(_pending_shards):
        raise ValueError(
            f"rebuilt model parameters {sorted(set(params) ^ set(_pending_shards))[:4]} do not "
            "match the re-sharded weights"
        )
    for name, param in params.items():
        shard = _pending_shards[name]
        if (param.shape, param.dtype) != (shard.shape, shard.dtype):
            raise ValueError(f"{name}: rebuilt {list(param.shape)} {param.dtype} vs "
                             f"re-sharded {list(shard.shape)} {shard.dtype}")
        adopt(param, shard)
    # The checkpoint iterator `weights` is a lazy generator: never iterated, no disk read.
    return None
