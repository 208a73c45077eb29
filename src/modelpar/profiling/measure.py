"""`modelpar profile`: measure this machine as a cluster spec, so the planner can predict it.

This module measures (inside spawned ranks); the fits that turn the timings into a device and
links, and the assembled ClusterSpec, are `modelpar.profiling.fits` (pure, tested without
processes; each fit's docstring gives its formula). The README's profile table lists the fields.

Why: the cost model's global constants were fitted on GPUs running fused kernels. A CPU running
this project's eager PyTorch over gloo is another device (microseconds per eager op, small GEMMs
far from peak, keyed dropout over every element, millisecond collectives), so its rates are
measured as properties of the device, and the cost model uses a measured value whenever the
spec carries one.

Ranks share the host: `modelpar train` spawns one process per rank, each with
`torch.set_num_threads(cores // ranks)` (`runtime.launch`). For each k in `--ranks` (default 1,
2, 4, 8) the profile measures what ONE rank achieves while k ranks run the same benchmark at
once, spawned exactly as the runtime spawns them: a `SharedHostProfile` (a device and a link) per
k. A plan of N ranks takes the link of the smallest profiled k >= N; its device is that
profile's while N <= cores, else the device of one rank per core, the cost model then sharing
the cores among the ranks that compute at each moment (`planner.shared_host`).

Measured per k (median over ranks of the median of timed windows, so that the time slices of an
oversubscribed host average out): GEMMs as training runs them, forward and backward
(`fits.fit_gemm`: peak rate and operand bandwidth); the runtime's own TransformerLayer on
reference shapes, each inside a stack of REFERENCE_STACK distinct layers (`fits.fit_layer_bandwidth`:
the effective rate of the memory-bound kernels; with --fast, a block of norm / GELU / softmax
instead); a chain of tiny ops (per-op overhead) and a tiny layer (`fits.fit_layer_overheads`);
the reference layers with dropout (the keyed dropout's cost per element; with --fast, the
dropouts alone); the runtime's AdamW step; gloo all-reduce and all-gather among the k ranks,
timed on the last rank to arrive (`fits.fit_link`), and a point-to-point send (raw data only);
for k > 1 the runtime's tensor-parallel layers split over the k ranks (`fits.fit_tensor_link`:
inside a layer the collectives' threads compete with every rank's GEMMs for the cores). Not
measured: power and memory capacity (nominal figures shared by the ranks).

GPUs: with a GPU for each rank of the largest k (`--ranks 1` on a one-GPU machine) the same
measurements run on the GPUs over NCCL with CUDA-synchronised windows and GPU-sized shapes
(`GPU_*`); `--dtype bf16` measures 16-bit kernels and traffic, as `modelpar train --dtype bf16` runs.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modelpar.models.gpt import DropoutKey, DropoutSite, TransformerLayer, keyed_dropout
from modelpar.models.gpt_parallel import ParallelAttention, ParallelMLP
from modelpar.profiling.fits import (DEFAULT_RANKS, GPU_REFERENCE_LAYERS, REFERENCE_LAYERS, TENSOR_REFERENCE_LAYERS,
                                     TINY_REFERENCE_LAYER, VALUE_BYTES, build_cluster,
                                     forward_backward_terms, host_facts, reference_layer_spec, shared_host_profile)
from modelpar.runtime.launch import choose_backend, spawn
from modelpar.runtime.precision import DTYPES
from modelpar.runtime.zero import AdamW
from modelpar.specs import ClusterSpec

BUSY_LOAD_PER_CORE = 0.5
"""A 1-minute load average above this many runnable processes per core before profiling means
other work is running: the command warns that the figures will be pessimistic."""

# (tokens, in, out): linear layers of small transformers; timed forward + backward (3 GEMMs).
LINEAR_SHAPES = (
    (128, 128, 128), (256, 256, 256), (256, 256, 768), (256, 256, 1024), (256, 1024, 256), (512, 512, 512),
    (1024, 256, 256), (256, 128, 512), (512, 1024, 256),
)
FAST_LINEAR_SHAPES = ((32, 32, 32), (64, 64, 64), (64, 128, 64))
# (batch, s, d): attention-like batched products S = A B with A [batch, s, d], B [batch, d, s].
BATCHED_SHAPES = ((16, 128, 32), (16, 128, 64), (8, 256, 32))
FAST_BATCHED_SHAPES = ((4, 32, 16),)
ELEMENTWISE_SIZES = (2**16, 2**18, 2**20)
FAST_ELEMENTWISE_SIZES = (2**14, 2**16)
ELEMENTWISE_VALUES_MOVED = 17
"""Values per element that the cost model counts for the elementwise benchmark block: layer
norm (forward reads and writes: 2, backward 4), GELU (2 + 4), softmax (2 + 3, `compute.py`)."""
ROW = 128  # width of the softmax and layer-norm rows of the elementwise block
DROPOUT_SHAPES = ((2, 8, 128, 128), (2, 128, 256), (2, 128, 256))
"""The dropouts of one layer of a small model (`gpt-small-cpu`, b = 2): attention probabilities
[b, a, s, s] and the two residual branches [b, s, h]; the per-element cost grows with the size
(int64 hash temporaries leave the caches), so the benchmark uses a layer's mix."""
FAST_DROPOUT_SHAPES = ((1, 2, 32, 32), (1, 32, 64), (1, 32, 64))
# GPUs: CPU-sized kernels only measure launch latency there, so a GPU rank uses shapes of the
# size GPT training runs on it (the same tables otherwise).
GPU_LINEAR_SHAPES = (
    (2048, 1024, 1024), (4096, 2048, 2048), (4096, 4096, 4096), (8192, 4096, 4096), (4096, 4096, 16384),
    (8192, 2048, 8192), (2048, 768, 3072), (4096, 1024, 4096),
)
GPU_BATCHED_SHAPES = ((64, 1024, 64), (128, 1024, 128), (64, 2048, 128))
GPU_ELEMENTWISE_SIZES = (2**22, 2**24, 2**26)
REFERENCE_STACK = 8
"""Distinct layers a reference layer is timed among (`_LayerStack`): one layer repeated stays in cache."""
GPU_DROPOUT_SHAPES = ((4, 16, 1024, 1024), (4, 1024, 1024), (4, 1024, 1024))
COLLECTIVE_BYTES = (2**12, 2**16, 2**18, 2**20, 2**22)
LATE_ARRIVAL_S = 0.002
FAST_COLLECTIVE_BYTES = (2**10, 2**14)


@dataclass(frozen=True)
class ProfileOptions:
    """What to measure and how long. `fast`: tiny sizes and short windows (tests, a quick look)."""

    ranks: tuple[int, ...] = DEFAULT_RANKS
    fast: bool = False
    dtype: str = "fp32"

    @property
    def window_s(self) -> float:
        """Length of one timed window: several scheduler time slices."""
        return 0.01 if self.fast else 0.06

    @property
    def windows(self) -> int:
        return 3 if self.fast else 5

    @property
    def collective_repeats(self) -> int:
        return 3 if self.fast else 9


# --- measuring (inside a spawned rank) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Bench:
    """Where a rank measures: its torch device and dtype, and how to wait for queued kernels."""

    options: ProfileOptions
    device: object  # torch.device
    dtype: object  # torch.dtype
    sharing: float = 1.0  # ranks per core when they outnumber the cores: windows grow by it

    @property
    def window_s(self) -> float:
        """One timed window: with k ranks on fewer cores each gets 1 / sharing of the time slices,
        so a window spans as many of its own slices as an unshared one."""
        return self.options.window_s * self.sharing

    def sizes(self, cpu: tuple, fast: tuple, gpu: tuple) -> tuple:
        """The shape table for this rank: tiny with --fast, GPU-sized on a GPU, else `cpu`."""
        if self.options.fast:
            return fast
        return gpu if self.device.type == "cuda" else cpu

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tensor(self, *shape, grad: bool = False, fill: float | None = None):
        values = (torch.randn(*shape, device=self.device, dtype=self.dtype) if fill is None
                  else torch.full(shape, fill, device=self.device, dtype=self.dtype))
        return values.requires_grad_(grad)

    def seconds_per_call(self, fn) -> float:
        """Median over the windows of (window length / calls in it); one warm-up call."""
        return self.paired_seconds_per_call(fn)[0]

    def paired_seconds_per_call(self, *fns) -> list[float]:
        """`seconds_per_call` of each function, their windows alternating (a, b, a, b, ...) so that
        drift of a shared machine hits them alike: their differences are what is used."""
        for fn in fns:
            fn()
        self.synchronize()
        results: list[list[float]] = [[] for _ in fns]
        for _ in range(self.options.windows):
            for fn, times in zip(fns, results):
                calls, start = 0, time.perf_counter()
                while True:
                    fn()
                    calls += 1
                    if time.perf_counter() - start >= self.window_s:
                        break
                self.synchronize()
                times.append((time.perf_counter() - start) / calls)
        return [statistics.median(times) for times in results]


def _op_overhead(bench: _Bench) -> float:
    """Seconds per eager op with autograd: a chain of tiny multiplies, forward and backward."""
    length = 32
    leaf = bench.tensor(4, grad=True)

    def chain():
        value = leaf
        for _ in range(length):
            value = value * 1.0001
        value.sum().backward()

    return bench.seconds_per_call(chain) / (2 * length + 2)


def _measure_gemms(bench: _Bench, value_bytes: int) -> list[tuple[float, float, int, float]]:
    samples = []
    for tokens, width_in, width_out in bench.sizes(LINEAR_SHAPES, FAST_LINEAR_SHAPES, GPU_LINEAR_SHAPES):
        x, grad = bench.tensor(tokens, width_in, grad=True), bench.tensor(tokens, width_out)
        weight, bias = bench.tensor(width_out, width_in, grad=True), bench.tensor(width_out, grad=True, fill=0.0)
        seconds = bench.seconds_per_call(lambda: F.linear(x, weight, bias).backward(grad))
        samples.append((*forward_backward_terms(tokens, width_out, width_in, 1, value_bytes), seconds))
    for batch, seq, width in bench.sizes(BATCHED_SHAPES, FAST_BATCHED_SHAPES, GPU_BATCHED_SHAPES):
        left, right = bench.tensor(batch, seq, width, grad=True), bench.tensor(batch, width, seq, grad=True)
        grad = bench.tensor(batch, seq, seq)
        seconds = bench.seconds_per_call(lambda: (left @ right).backward(grad))
        samples.append((*forward_backward_terms(seq, seq, width, batch, value_bytes), seconds))
    return samples


def _measure_elementwise(bench: _Bench, value_bytes: int) -> list[tuple[float, float]]:
    samples = []
    for size in bench.sizes(ELEMENTWISE_SIZES, FAST_ELEMENTWISE_SIZES, GPU_ELEMENTWISE_SIZES):
        values, ones = bench.tensor(size // ROW, ROW, grad=True), bench.tensor(size // ROW, ROW, fill=1.0)
        norm_weight, norm_bias = bench.tensor(ROW, grad=True, fill=1.0), bench.tensor(ROW, grad=True, fill=0.0)

        def block():
            F.layer_norm(values, (ROW,), norm_weight, norm_bias).backward(ones)
            F.gelu(values).backward(ones)
            torch.softmax(values, dim=-1).backward(ones)

        samples.append((ELEMENTWISE_VALUES_MOVED * value_bytes * size, bench.seconds_per_call(block)))
    return samples


class _LayerStack:
    """REFERENCE_STACK distinct layers of one reference shape (hidden, heads, MLP width, sequence,
    micro-batch) and their input, run as a model runs its layers: forward through all, then
    backward through all. (One layer repeated keeps its weights and activations in cache; in a
    model each layer's weights were evicted by the others since its last use, which costs 3-16%
    on a CPU with these shapes.) `split`: attention and MLP split over all the profile's ranks
    (the runtime's own ParallelAttention / ParallelMLP, no sequence parallelism)."""

    def __init__(self, bench: _Bench, shape: tuple, dropout: float = 0.0, split: bool = False) -> None:
        hidden, heads, mlp, seq, batch = shape
        spec = reference_layer_spec(hidden, heads, mlp, seq, dropout)
        self.layers = []
        for index in range(REFERENCE_STACK):
            layer = TransformerLayer(spec, index)
            if split:
                layer.attention = ParallelAttention.from_serial(layer.attention, None, False)
                layer.mlp = ParallelMLP.from_serial(layer.mlp, None, False)
            self.layers.append(layer.to(bench.device, bench.dtype))
        self.x, self.grad = bench.tensor(batch, seq, hidden, grad=True), bench.tensor(batch, seq, hidden)
        self.key = DropoutKey(0, 0)

    def forward(self):
        hidden_states = self.x
        for layer in self.layers:
            hidden_states = layer(hidden_states, self.key)
        return hidden_states

    def forward_backward(self) -> None:
        self.forward().backward(self.grad)


def _measure_reference_layers(bench: _Bench) -> list[tuple[float, float]]:
    """(seconds without dropout, seconds with dropout 0.1) of forward + backward of one reference
    layer (the runtime's own TransformerLayer) inside a `_LayerStack`, in alternating windows (the
    dropout cost is their difference). None with --fast."""
    seconds = []
    for shape in bench.sizes(REFERENCE_LAYERS, (), GPU_REFERENCE_LAYERS):
        stacks = [_LayerStack(bench, shape, dropout) for dropout in (0.0, 0.1)]
        seconds.append(tuple(value / REFERENCE_STACK
                             for value in bench.paired_seconds_per_call(*(s.forward_backward for s in stacks))))
    return seconds


def _measure_tiny_layer(bench: _Bench) -> tuple[float, float, float] | None:
    """(forward, forward + backward, forward + backward with dropout 0.1) seconds of one layer of
    TINY_REFERENCE_LAYER, inside a `_LayerStack`, in alternating windows: its kernels cost next to
    nothing, so what is left over the cost model's kernels is the fixed cost of a layer (module
    calls, Python-level autograd functions) and of drawing its dropout masks. None with --fast."""
    if bench.options.fast:
        return None
    plain, dropped = _LayerStack(bench, TINY_REFERENCE_LAYER), _LayerStack(bench, TINY_REFERENCE_LAYER, 0.1)
    seconds = bench.paired_seconds_per_call(plain.forward, plain.forward_backward, dropped.forward_backward)
    return tuple(value / REFERENCE_STACK for value in seconds)


def _measure_tensor_parallel_layers(bench: _Bench) -> list[float]:
    """Seconds of forward + backward of one tensor-parallel reference layer split over all the
    ranks of the profile, inside a `_LayerStack` (no dropout); none with --fast or a single rank."""
    if bench.options.fast or dist.get_world_size() == 1:
        return []
    seconds = []
    for shape in TENSOR_REFERENCE_LAYERS:
        stack = _LayerStack(bench, shape, split=True)
        dist.barrier()
        seconds.append(bench.seconds_per_call(stack.forward_backward) / REFERENCE_STACK)
    return seconds


def _while_others_compute(bench: _Bench, measure):
    """`measure()` on each rank in turn while the other ranks multiply matrices (as in training,
    where a rank's memory-bound kernels rarely coincide with the same kernels on the others);
    returns this rank's result."""
    left, right = bench.tensor(256, 256), bench.tensor(256, 256)
    result = None
    for turn in range(dist.get_world_size()):
        dist.barrier()
        if dist.get_rank() == turn:
            result = measure()
            dist.barrier()
        else:
            done = dist.barrier(async_op=True)
            while not done.is_completed():
                left @ right
            done.wait()
    return result


def _measure_device(bench: _Bench, value_bytes: int) -> dict:
    fast = bench.options.fast
    dropout_inputs = [bench.tensor(*shape, grad=True)
                      for shape in bench.sizes(DROPOUT_SHAPES, FAST_DROPOUT_SHAPES, GPU_DROPOUT_SHAPES)]
    dropout_grads = [bench.tensor(*values.shape) for values in dropout_inputs]
    key = DropoutKey(0, 0)

    def dropouts():
        for site, (values, grad) in enumerate(zip(dropout_inputs, dropout_grads)):
            keyed_dropout(values, 0.1, key, 0, DropoutSite(site + 2), True).backward(grad)

    dropout_s = _while_others_compute(bench, lambda: bench.seconds_per_call(dropouts))
    dropout_elements = sum(values.numel() for values in dropout_inputs)
    tensors, size = (4, 2**12) if fast else (32, 2**16)
    params = [torch.nn.Parameter(torch.randn(size, device=bench.device)) for _ in range(tensors)]  # fp32 master
    for param in params:
        param.grad = torch.randn(size, device=bench.device)
    optimizer = AdamW(params, lr=1e-3, weight_decay=0.1)
    return {
        "threads": torch.get_num_threads(),
        "op_overhead_s": _op_overhead(bench),
        "gemm": _measure_gemms(bench, value_bytes),
        "elementwise": _measure_elementwise(bench, value_bytes),
        "reference_layers": _measure_reference_layers(bench),
        "tensor_layers": _measure_tensor_parallel_layers(bench),
        "tiny_layer": _measure_tiny_layer(bench),
        "dropout_ns_per_element": dropout_s / dropout_elements * 1e9,
        "optimizer_ns_per_parameter": bench.seconds_per_call(optimizer.step) / (tensors * size) * 1e9,
    }


def _time_collective(fn, repeats: int, bench: _Bench) -> float:
    """Median seconds of `fn` on this rank. The last rank arrives LATE_ARRIVAL_S after the others
    (it multiplies matrices first), as a rank finishing its GEMMs does in training: the others
    are already waiting, asleep, and its time is the exposed part of the collective, waking them
    included (`report.comparison` measures the same part: a span less its wait for the last)."""
    late = dist.get_rank() == dist.get_world_size() - 1
    left, right = bench.tensor(128, 128), bench.tensor(128, 128)
    fn()
    bench.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if late:
            arrive = time.perf_counter() + LATE_ARRIVAL_S
            while time.perf_counter() < arrive:
                left @ right
            bench.synchronize()
        start = time.perf_counter()
        fn()
        bench.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_link(rank: int, world: int, bench: _Bench, value_bytes: int) -> list[tuple[str, int, float, float]]:
    samples = []
    for num_bytes in (FAST_COLLECTIVE_BYTES if bench.options.fast else COLLECTIVE_BYTES):
        values = bench.tensor(num_bytes // value_bytes, fill=0.0)
        parts = [bench.tensor(num_bytes // value_bytes, fill=0.0) for _ in range(world)]

        def send_receive():
            if rank == 0:
                dist.send(values, dst=1)
            elif rank == 1:
                dist.recv(values, src=0)

        for name, fn in (("all_reduce", lambda: dist.all_reduce(values)),
                         ("all_gather", lambda: dist.all_gather(parts, values)),
                         ("p2p", send_receive)):
            samples.append((name, world, float(num_bytes), _time_collective(fn, bench.options.collective_repeats,
                                                                            bench)))
    return samples


def _profile_worker(rank: int, world: int, options: ProfileOptions) -> dict:
    """Spawned rank: device measurements while all `world` ranks run them, then the link. On
    NCCL (a GPU per rank) the launcher made this rank's GPU the current device."""
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    sharing = 1.0 if on_gpu else max(1.0, dist.get_world_size() / (os.cpu_count() or 1))
    bench = _Bench(options, device, DTYPES[options.dtype], sharing)
    value_bytes = VALUE_BYTES[options.dtype]
    dist.barrier()
    measured = _measure_device(bench, value_bytes)
    measured["device_type"] = device.type
    measured["device_name"] = torch.cuda.get_device_name(device) if on_gpu else None
    measured["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30 if on_gpu else None
    link = _measure_link(rank, world, bench, value_bytes) if world > 1 else []
    return {"rank": rank, "device": measured, "link": link}


def profile_machine(options: ProfileOptions = ProfileOptions(), timeout_s: float = 600.0,
                    log=None) -> tuple[ClusterSpec, dict]:
    """Measure this machine for every k in `options.ranks`; returns (cluster, raw measurements).
    With a GPU for every rank the ranks run on the GPUs over NCCL, else on the CPU over gloo."""
    backend = choose_backend(max(options.ranks))
    host = host_facts()
    load_before = _load_average()
    if log is not None and load_before is not None and load_before > BUSY_LOAD_PER_CORE * host["cores"]:
        log(f"warning: this machine is busy (load average {load_before:.1f} on {host['cores']} cores): other "
            f"processes slow every measurement; profile again when it is idle")
    profiles, summaries = [], []
    for ranks in options.ranks:
        started = time.perf_counter()
        results = spawn(_profile_worker, ranks, (options,), timeout_s=timeout_s, backend=backend)
        profile, summary = shared_host_profile(ranks, results, host, options.dtype, options.fast)
        profiles.append(profile)
        summaries.append(summary)
        if log is not None:
            device = profile.device
            log(f"{ranks} rank(s): GEMM {device.peak_tflops * 1e3:.1f} GFLOP/s, operands "
                f"{device.matmul_operand_bandwidth_gb_per_s:.1f} GB/s, memory {device.memory_bandwidth_gb_per_s:.1f} "
                f"GB/s, op {device.kernel_overhead_us:.1f} us, dropout {device.dropout_ns_per_element:.1f} ns/el, "
                f"link {profile.bandwidth_gb_per_s:.2f} GB/s + {profile.latency_us:.0f} us"
                + (f", in tensor-parallel layers {profile.tensor_bandwidth_gb_per_s:.2f} GB/s + "
                   f"{profile.tensor_latency_us:.0f} us" if profile.tensor_bandwidth_gb_per_s else "")
                + " "
                f"({time.perf_counter() - started:.1f} s)")
    return build_cluster(profiles, host, backend == "nccl"), {
        "host": host, "backend": backend, "dtype": options.dtype, "fast": options.fast, "profiles": summaries,
        "load_average_before": load_before, "load_average_after": _load_average()}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
