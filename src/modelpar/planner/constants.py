"""The cost model's global constants: few, named, physically meaningful, the same for every run.

Every number the step-time model uses that is not in the model, cluster or plan spec lives here.
There are no per-run, per-paper or per-device factors: a constant describes how well *any*
accelerator or network runs a class of work, and is meant to hold on runs that were not used to
choose it.

Four are fitted: MATMUL_EFFICIENCY, MEMORY_BANDWIDTH_EFFICIENCY, NETWORK_EFFICIENCY and
KERNEL_OVERHEAD_S were chosen on a grid (steps of 0.05 / 0.05 / 0.05 / 3-5 us over 0.65-0.9,
0.6-0.9, 0.6-0.9 and 0-15 us), minimising the larger of the overall median and the per-source
medians of |predicted / measured - 1| from `modelpar validate` on
`shared/validation/published_runs.json` (89 runs, 6 sources, A100 / H100 / TPU v4). The optimum
is flat: anything within +-0.05 of these values moves the overall median by under 2 points, and
every value lies inside the range microbenchmarks report. The others are counts or chosen from
practice, not fitted.

Structural counts (bytes an operator moves, FLOPs of a layer) are not constants: they follow from
the operator and are derived in `compute.py` / `flops.py`.
"""

from __future__ import annotations

MATMUL_EFFICIENCY = 0.75
"""Fraction of the device's dense 16-bit peak that the arithmetic of a large matrix multiply
sustains (the FLOP term of `compute.gemm_time`; the operand traffic is a separate term).

Fitted. cuBLAS reaches 75-88% of the A100's 312 TFLOP/s on large bf16 GEMMs in isolation, and
less under sustained load at board power; FlashAttention-2 reaches 70-75% in the forward.
"""

MEMORY_BANDWIDTH_EFFICIENCY = 0.70
"""Fraction of the device's peak memory bandwidth that memory-bound kernels (norms, activation
functions, dropout, residual adds, cross-entropy, the optimizer step) and GEMM operand traffic
reach.

Fitted. Copy kernels reach 80-90% of HBM peak on A100/H100; the many small, strided or reducing
kernels of a transformer layer reach less.
"""

NETWORK_EFFICIENCY = 0.70
"""Fraction of the nominal link bandwidth (per-device NVLink/ICI, per-NIC InfiniBand) that ring
collectives and point-to-point transfers achieve (bus bandwidth / link bandwidth).

Fitted. nccl-tests all-reduce bus bandwidth on a DGX A100 is ~230 of 300 GB/s over NVLink (0.77)
and 20-23 of 25 GB/s per HDR NIC (0.8-0.9) for large messages; the 2-400 MB messages of
tensor-parallel layers get less.
"""

KERNEL_OVERHEAD_S = 5e-6
"""Fixed cost of every kernel (launch, ramp-up and the tail of its last wave), seconds.

Fitted. Matters only for small micro-batches and narrow tensor-parallel shards, where a layer is
many short kernels; CUDA kernel launch latency is 3-10 us.
"""

GRADIENT_BYTES = 2
"""Bytes per gradient element that data-parallel reductions send (16-bit gradients, as in
Megatron-LM's fp16 runs and DeepSpeed). Not fitted."""

ADAM_BYTES_PER_PARAMETER = 34
"""Memory traffic of one mixed-precision Adam step per parameter, bytes. Not fitted: reads the
gradient (4) and fp32 master weight, momentum and variance (12), writes those three (12) and the
16-bit weight copy (2); the gradient-norm / unscale pass reads the gradient again (4)."""

USABLE_MEMORY_FRACTION = 0.9
"""Share of device memory a plan may fill; the rest is the CUDA context, communication buffers
and the caching allocator's fragmentation, which `memory.py` does not count. Not fitted: about
1 GB of context and NCCL buffers plus 5-10% fragmentation is typical of PyTorch training on
40-80 GB GPUs."""
