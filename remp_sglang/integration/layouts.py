"""Which layouts a server may take: SGLang's own rules for a (dp, tp, pp) on this model
and launch (shared by the HTTP routes and the schedulers), and the automatic policy's
candidates."""

from __future__ import annotations

from typing import Any

from remp_sglang.integration.config import RempConfig
from remp_sglang.topology import Topology, layouts


def validate_layout(
    body: Any, config: RempConfig, hf_config: Any, cpu: bool = False,
    current: tuple[int, int, int] | None = None,
) -> Topology:
    """The layout a reshape request asks for, or ValueError with the reason (-> 400).

    A field left out keeps its `current` value (dp, tp, pp), but a server launched with
    replicas fills its ranks when dp is left out (`{"tp": 2}` on 2 ranks merges,
    `{"tp": 1}` splits): ranks are parked only when a smaller dp is asked for.
    Refused here, before anything moves, is every layout SGLang would reject at model
    build: heads and KV heads (its QKV split), the MLP's intermediate size and the padded
    vocabulary (its `divide`), layers per stage. On CPU, SGLang pads KV (and query) heads
    when tp does not divide the KV heads rather than replicating them as on GPU; remp
    moves only unpadded layouts there. Replicas need SGLang's data-parallel controller
    (launch with --dp-size), and each replica's first rank must be one it feeds (a
    launch replica's first rank).
    """
    if not isinstance(body, dict):
        raise ValueError('body must be a JSON object like {"tp": 2, "pp": 1}')
    unknown = sorted(set(body) - {"dp", "tp", "pp"})
    if unknown:
        raise ValueError(f"unknown fields {unknown}; expected dp, tp and pp")
    keep = dict(zip(("dp", "tp", "pp"), current or (1, 1, 1), strict=True))
    values = []
    for name in ("tp", "pp", "dp"):
        value = body.get(name, keep[name])
        if name == "dp" and "dp" not in body and config.launch_dp > 1:
            value = max(1, config.launch_world_size // (values[0] * values[1]))
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        values.append(value)
    tp, pp, dp = values
    world = config.launch_world_size
    if dp * tp * pp > world:
        raise ValueError(f"dp*tp*pp = {dp * tp * pp} exceeds the {world} ranks this "
                         f"server was launched with")
    if dp > 1 and config.launch_dp == 1:
        raise ValueError("dp > 1 needs SGLang's data-parallel controller: launch with "
                         "--dp-size")
    launch_replica = world // config.launch_dp
    if dp > 1 and (tp * pp) % launch_replica:
        raise ValueError(f"each replica's first rank must be one SGLang feeds requests to "
                         f"(a multiple of the launch tp*pp = {launch_replica}): tp*pp = "
                         f"{tp * pp} is not")
    from remp_sglang.integration.model_state import decoder_of

    decoder = decoder_of(hf_config, torch_dtype_of(hf_config))
    topo = Topology(tp, pp, world, dp)
    topo.check_model(decoder.shape)
    sglang_divides(tp, decoder.intermediate_size, decoder.vocab_size)
    if cpu and decoder.shape.num_kv_heads % tp:
        raise ValueError(f"on CPU, tp={tp} must divide the {decoder.shape.num_kv_heads} KV "
                         "heads (SGLang pads heads there instead of replicating them)")
    return topo


def sglang_divides(tp: int, intermediate_size: int, vocab_size: int) -> None:
    """SGLang's own divisibility rules for tp (ValueError naming the size)."""
    from sglang.srt.layers.vocab_parallel_embedding import (
        DEFAULT_VOCAB_PADDING_SIZE,
        pad_vocab_size,
    )

    if intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide the MLP intermediate size {intermediate_size} "
                         "(SGLang's column-parallel split)")
    padding = DEFAULT_VOCAB_PADDING_SIZE  # SGLang widens the padding when tp needs it
    if pad_vocab_size(vocab_size, padding) % tp:
        padding *= tp
    if pad_vocab_size(vocab_size, padding) % tp:
        raise ValueError(f"tp={tp} cannot split the vocabulary of {vocab_size} tokens")


def torch_dtype_of(hf_config: Any) -> Any:
    import torch

    return getattr(hf_config, "torch_dtype", None) or torch.float32


def policy_candidates(config: RempConfig, hf_config: Any, cpu: bool) -> list[Topology]:
    """The layouts the automatic policy chooses from: those its settings name, else every
    layout that uses all the launched ranks; each one SGLang would build."""
    from remp_sglang.policy import PolicyConfig

    wanted = PolicyConfig.from_dict(config.policy_settings).candidates
    if not wanted:
        return [t for t in allowed_layouts(config, hf_config, cpu)
                if t.num_active == config.launch_world_size]
    return [validate_layout({"dp": dp, "tp": tp, "pp": pp}, config, hf_config, cpu=cpu)
            for dp, tp, pp in wanted]


def allowed_layouts(config: RempConfig, hf_config: Any, cpu: bool) -> list[Topology]:
    """Every layout a reshape of this launch may ask for (`validate_layout` accepts it):
    the worlds prepared at launch are theirs."""
    from remp_sglang.integration.model_state import decoder_of

    shape = decoder_of(hf_config, torch_dtype_of(hf_config)).shape
    out = []
    for topo in layouts(config.launch_world_size, shape, replicas=config.launch_dp > 1):
        try:
            out.append(validate_layout(topo.layout(), config, hf_config, cpu=cpu))
        except ValueError:
            continue
    return out


def max_input_of(context_len: int, capacity: int) -> int:
    """SGLang's longest admissible prompt for a pool of `capacity` slots (its worker's
    `max_req_input_len`)."""
    return min(context_len - 1, capacity - 1) - 5
