"""A simulator of a ReMP-SGLang cluster on hardware we do not have (8x H100, H200).

It replays real request traces (`traces`) against the same performance model
(`remp_sglang.perf.StepModel`) and the very policy object (`remp_sglang.policy.Policy`)
the server runs, on devices described by `hardware`, for the models in `models`; a
switch pauses the cluster for the planner's bytes over the link plus a fixed cost
(`downtime`). `cluster` is the event loop. Pure Python: no torch, no sglang, so it runs
anywhere and in the tests.

What it does NOT model is `NOT_MODELLED` below (a simulated number is an estimate from
these assumptions).
"""

NOT_MODELLED = """\
- chunked prefill and mixed prefill/decode batches: a prefill batch runs alone and
  whole, and has priority over decoding (SGLang's default order), so long prompts stall
  the decode of the others;
- SGLang's new-token-ratio admission and its retraction under memory pressure: a
  replica reserves prompt + output for every running request (retraction happens only
  when a switch leaves a new replica too small);
- step times beyond `perf.StepModel`'s roofline (one sustained FLOP fraction, datasheet
  or measured bandwidths): no CUDA graphs, kernel launch detail, or measured GPU steps;
- network contention between replicas or with a switch's transfers; a switch's
  transfers overlapping serving (the whole cluster pauses);
- cache-aware dispatch (requests go to the least loaded replica) and a prefix cache
  finer than Mooncake's 512-token blocks (Azure's traces have no prefix information);
- speculative decoding, request content, client timeouts, failures of a switch;
- a client's max_new_tokens: the policy's samples carry each request's true output
  length from the trace, where a server knows only its limit;
- the context limit of a checkpoint (the 128K of Llama-3.1 / Qwen2.5 is assumed)."""
