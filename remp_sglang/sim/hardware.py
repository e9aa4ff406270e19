"""Devices the simulator can model, as `perf.Hardware` records, and the switch's fixed cost.

Sources (`../shared/design/figures.md` unless said otherwise):

- FLOPs: the datasheet's dense BF16 rate (989 TFLOP/s for H100 SXM and H200) is NOMINAL;
  we assume a sustained fraction of 0.6 of it (an ASSUMPTION, typical of large GEMMs in
  serving; not measured here).
- Memory bandwidth: MEASURED device-to-device copies, about 3.0 TB/s on H100 SXM
  (3.35 nominal) and 4.3 TB/s on H200 (4.8 nominal).
- Links: NVLink 4, MEASURED about 380 GB/s one way per GPU (450 nominal).
- Latency of one collective (10 us) and the host's cost per scheduler step (2 ms) are
  ASSUMPTIONS (NCCL small all-reduce inside one node; SGLang's scheduler with CUDA
  graphs), to be replaced by measured values when a GPU run gives them.
- Memory: what nvidia-smi reports (81559 MiB for the 80 GB H100, 143771 MiB for the
  141 GB H200).

`CPU_TINY` is this machine's CPU ranks (gloo, float32 tiny model): figures fitted to
step times measured on a live server at DP 2, TP 2 and PP 2 (`bench/step_model.py`;
median error 5-12% per layout, largest 41%). They are effective figures, not the
hardware's: the memory bandwidth also absorbs per-step costs the model has no term for.
"""

from __future__ import annotations

from remp_sglang.perf import Hardware

MIB = 1 << 20
SUSTAINED_FLOPS = 0.6  # share of the nominal dense BF16 rate a serving step sustains
MEM_FRACTION_STATIC = 0.9  # SGLang's --mem-fraction-static: a rank's budget of its memory

H100_SXM = Hardware(
    name="H100-SXM-80GB",
    flops=989e12 * SUSTAINED_FLOPS,
    mem_bw=3.0e12,
    link_bw=380e9,
    link_latency_s=10e-6,
    step_overhead_s=2e-3,
    memory_bytes=81559 * MIB,
)

H200 = Hardware(
    name="H200-141GB",
    flops=989e12 * SUSTAINED_FLOPS,
    mem_bw=4.3e12,
    link_bw=380e9,
    link_latency_s=10e-6,
    step_overhead_s=2e-3,
    memory_bytes=143771 * MIB,
)

CPU_TINY = Hardware(  # fitted by bench/step_model.py (bench/results/step_model-cpu.txt)
    name="CPU-tiny (fitted)",
    flops=2.105e+10,
    mem_bw=3.679e+08,  # effective: it absorbs the per-step weight-read overhead
    link_bw=1e+09,
    link_latency_s=0.003228,
    step_overhead_s=0.005,
    memory_bytes=1 << 30,
)

# A GPU switch's cost beside its transfers (teardown, communication groups, model and CUDA
# graph rebuild, cache import): ASSUMED, no GPU reshape of this project has been measured.
# ReMP reports 6-7 s for 70B on 8x H100 (bench/simulate.py runs that too).
GPU_SWITCH_FIXED_S = 2.0
REMP_70B_SWITCH_S = (6.0, 7.0)
