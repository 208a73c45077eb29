"""The pure half of `modelpar profile`: the fits that turn timings into a device and links, and
the cluster spec assembled from them.

Each fit takes what the spawned ranks measured (`modelpar.profiling.measure`) and returns the parameters of
the cost model's own formulas (`planner.compute`, `planner.comm`), so the planner predicts the
measured machine with the same equations it uses for GPUs. No torch here: tests feed the fits
synthetic timings made with those formulas and check that they recover the parameters.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import replace

import numpy as np

from modelpar.planner import compute
from modelpar.specs import ClusterSpec, DeviceSpec, ModelSpec, SpecError
from modelpar.specs.cluster import SharedHostProfile

VALUE_BYTES = {"fp32": 4, "bf16": 2}
DEFAULT_RANKS = (1, 2, 4, 8)
"""Rank counts `modelpar profile` measures by default; a plan of N ranks uses the smallest >= N."""
HOST_POWER_WATTS = 65.0
"""Not measured: a nominal desktop/server CPU package power, shared equally by the ranks (used
only for the energy column)."""
GPU_REFERENCE_LAYERS = ((1024, 16, 4096, 1024, 4), (2048, 16, 8192, 1024, 2), (768, 12, 3072, 2048, 4))
TINY_REFERENCE_LAYER = (32, 2, 128, 8, 1)
"""A layer whose kernels cost next to nothing: what it takes is fixed per-layer cost."""
# Reference layers (not the models one trains): (hidden, heads, MLP width, sequence, micro-batch).
REFERENCE_LAYERS = ((384, 6, 1536, 64, 2), (128, 4, 512, 256, 1), (192, 6, 768, 96, 3))
TENSOR_REFERENCE_LAYERS = ((384, 8, 1536, 64, 2), (128, 8, 512, 256, 1), (192, 8, 768, 96, 3))
"""Reference layers for the tensor-parallel fit (8 heads: any k in 1, 2, 4, 8 divides them)."""
TENSOR_COLLECTIVES_PER_LAYER = 4
"""All-reduces one tensor-parallel layer issues per forward + backward (`cost.tensor_comm_per_layer`):
the row-parallel outputs of attention and MLP, and the column-parallel input gradients."""


def _nonnegative_relative_fit(rows: list[list[float]], times: list[float]) -> list[float]:
    """x >= 0 minimising sum_i ((rows_i . x) / times_i - 1)^2 (least squares on relative error)."""
    from scipy.optimize import nnls  # the dev/profile extra; the planner never needs scipy

    matrix = np.array(rows, dtype=float) / np.array(times, dtype=float)[:, None]
    solution, _ = nnls(matrix, np.ones(len(times)))
    return [float(value) for value in solution]


def gemm_terms(m: float, n: float, k: float, batch: float = 1.0, value_bytes: int = 4) -> tuple[float, float]:
    """(FLOPs, operand bytes) of `batch` products (m x k) @ (k x n) (`compute.gemm_time`)."""
    return 2.0 * m * n * k * batch, value_bytes * batch * (m * k + k * n + m * n)


def forward_backward_terms(m: float, n: float, k: float, batch: float = 1.0,
                           value_bytes: int = 4) -> tuple[float, float, int]:
    """(FLOPs, operand bytes, GEMM calls) of Y = X W with X (m x k), W (k x n), forward and
    backward (dX = dY W^T, dW = X^T dY): `compute.gemm_with_backward_time`'s three products."""
    products = [gemm_terms(m, n, k, batch, value_bytes), gemm_terms(m, k, n, batch, value_bytes),
                gemm_terms(k, n, m, batch, value_bytes)]
    return sum(p[0] for p in products), sum(p[1] for p in products), len(products)


def fit_gemm(samples: list[tuple[float, float, int, float]]) -> tuple[float, float, float]:
    """(FLOP/s R, operand bytes/s W_op, seconds per call c) from samples (FLOPs, operand bytes,
    GEMM calls, seconds): the fit of t = FLOPs / R + bytes / W_op + calls c (module docstring).
    The cost model charges its own per-op overhead instead of c."""
    times = [sample[3] for sample in samples]
    rows = [[flops, num_bytes, float(calls)] for flops, num_bytes, calls, _ in samples]
    inverse_rate, inverse_bandwidth, intercept = _nonnegative_relative_fit(rows, times)
    if inverse_rate <= 0:  # noisy timings (a busy host): drop the operand term
        inverse_bandwidth = 0.0
        inverse_rate, intercept = _nonnegative_relative_fit([[row[0], row[2]] for row in rows], times)
    if inverse_rate <= 0:
        raise SpecError("profile: the GEMM timings do not grow with their FLOPs; re-run `modelpar profile` "
                        "on a quieter machine")
    rate = 1.0 / inverse_rate
    # An operand term the fit drops (0) means packing is free next to the arithmetic: use a rate
    # that makes it negligible rather than infinite.
    bandwidth = 1.0 / inverse_bandwidth if inverse_bandwidth > 0 else 1e6 * rate
    return rate, bandwidth, intercept


def fit_bandwidth(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(bytes/s W, seconds per call c) from samples (bytes moved, seconds): the fit of t = bytes / W + c."""
    times = [seconds for _, seconds in samples]
    inverse, intercept = _nonnegative_relative_fit([[num_bytes, 1.0] for num_bytes, _ in samples], times)
    if inverse <= 0:  # noisy timings (a busy host): no intercept
        (inverse,), intercept = _nonnegative_relative_fit([[num_bytes] for num_bytes, _ in samples], times), 0.0
    if inverse <= 0:
        raise SpecError("profile: elementwise timings do not grow with size; re-run `modelpar profile`")
    return 1.0 / inverse, intercept


def fit_layer_bandwidth(device: DeviceSpec, layer_seconds: list[float],
                        references: tuple = REFERENCE_LAYERS) -> float | None:
    """Effective bytes/s of the memory-bound kernels that make `compute.layer_compute` match the
    measured reference layers, with the device's measured GEMM rates and per-op overhead; None
    when the layers take less time than their GEMMs alone (noise), or no bandwidth fits.

    The cost model's layer time is linear in 1 / W: t(W) = A + B / W (A: GEMMs and per-op
    overheads, B: the bytes its elementwise kernels move), so A and B come from two evaluations
    and 1 / W from least squares on relative error, sum ((A_i + B_i x) / T_i - 1)^2."""
    numerator = denominator = 0.0
    for (hidden, heads, mlp, seq, batch), measured in zip(references, layer_seconds):
        spec = reference_layer_spec(hidden, heads, mlp, seq)
        times = []
        for bandwidth in (device.memory_bandwidth_gb_per_s, 2 * device.memory_bandwidth_gb_per_s):
            layer = compute.layer_compute(spec, replace(device, memory_bandwidth_gb_per_s=bandwidth), batch, 1, False,
                                          "none")
            times.append(layer.forward_s + layer.backward_s)
        inverse = 1.0 / (device.memory_bandwidth_gb_per_s * 1e9)
        bytes_moved = (times[0] - times[1]) / (inverse - inverse / 2)
        fixed = times[0] - bytes_moved * inverse
        numerator += bytes_moved / measured * (1.0 - fixed / measured)
        denominator += (bytes_moved / measured) ** 2
    if denominator <= 0 or numerator <= 0:
        return None
    return denominator / numerator


COLLECTIVE_TERMS = {
    # (coefficient of S / W, coefficient of a) for n ranks: `planner.comm`'s ring formulas.
    "all_reduce": lambda n: (2.0 * (n - 1) / n, 2.0 * (n - 1)),
    "all_gather": lambda n: ((n - 1) / n, float(n - 1)),
    "p2p": lambda n: (1.0, 1.0),
}


def fit_link(samples: list[tuple[str, int, float, float]]) -> tuple[float, float]:
    """(bytes/s, seconds per message) from samples (collective, ranks, bytes, seconds), fitted
    jointly to `COLLECTIVE_TERMS`."""
    rows, times = [], []
    for name, ranks, num_bytes, seconds in samples:
        bandwidth_term, latency_term = COLLECTIVE_TERMS[name](ranks)
        rows.append([bandwidth_term * num_bytes, latency_term])
        times.append(seconds)
    inverse_bandwidth, latency = _nonnegative_relative_fit(rows, times)
    bandwidth = 1.0 / inverse_bandwidth if inverse_bandwidth > 0 else 1e12
    return bandwidth, latency


def reference_layer_spec(hidden: int, heads: int, mlp: int, seq: int, dropout: float = 0.0) -> ModelSpec:
    """One GPT layer of the given shape (`REFERENCE_LAYERS`)."""
    return ModelSpec(name=f"reference-h{hidden}-s{seq}", num_layers=1, hidden_size=hidden, num_attention_heads=heads,
                     ffn_hidden_size=mlp, vocab_size=256, seq_length=seq, dropout=dropout)


def dropped_elements(hidden: int, heads: int, seq: int, batch: int) -> int:
    """Values one layer drops out: attention probabilities b a s^2 and two residual branches 2 b s h."""
    return batch * heads * seq * seq + 2 * batch * seq * hidden


def fit_layer_overheads(device: DeviceSpec, tiny: tuple[float, float, float] | None) -> DeviceSpec:
    """`device` with its fixed per-layer costs: the tiny reference layer's measured forward,
    backward and dropout times less what the cost model's kernels give for it (each at least 0).
    The dropout part is the with-dropout time less the without, less the per-element cost the
    device has so far (refitted afterwards, `shared_host_profile`)."""
    if tiny is None:
        return device
    forward, forward_backward, with_dropout = tiny
    hidden, heads, mlp, seq, batch = TINY_REFERENCE_LAYER
    layer = compute.layer_compute(reference_layer_spec(hidden, heads, mlp, seq), device, batch, 1, False, "none")
    dropout_elements = dropped_elements(hidden, heads, seq, batch) * (device.dropout_ns_per_element or 0.0) * 1e-9
    return replace(
        device,
        layer_forward_overhead_us=max(0.0, forward - layer.forward_s) * 1e6,
        layer_backward_overhead_us=max(0.0, forward_backward - forward - layer.backward_s) * 1e6,
        dropout_call_overhead_us=max(0.0, with_dropout - forward_backward - dropout_elements) * 1e6,
    )


def fit_tensor_link(device: DeviceSpec, ranks: int, layer_seconds: list[float],
                    bandwidth: float) -> tuple[float, float] | None:
    """(bandwidth B/s, latency s) of the all-reduces inside tensor-parallel layers: the isolated
    collectives' `bandwidth`, and the per-message latency a >= 0 that makes
    `compute.layer_compute` at t = `ranks` plus TENSOR_COLLECTIVES_PER_LAYER ring all-reduces of
    the [b, s, h] activation, 2 (k-1)/k S/W + 2 (k-1) a each, reproduce the measured reference
    layers (least squares on relative error). On a CPU the collectives' threads wait for cores
    the GEMMs of every rank hold, a cost per message, not per byte (the reference activations
    are too alike in size to tell the two apart). None when nothing is left for the collectives."""
    if ranks < 2 or not layer_seconds:
        return None
    weighted = weights = 0.0
    for (hidden, heads, mlp, seq, batch), measured in zip(TENSOR_REFERENCE_LAYERS, layer_seconds):
        layer = compute.layer_compute(reference_layer_spec(hidden, heads, mlp, seq), device, batch, ranks, False, "none")
        activation = batch * seq * hidden * compute.value_bytes(device)
        per = TENSOR_COLLECTIVES_PER_LAYER
        fixed = layer.forward_s + layer.backward_s + per * 2 * (ranks - 1) / ranks * activation / bandwidth
        slope = per * 2 * (ranks - 1)  # seconds per second of latency
        # minimise ((fixed + slope a) / measured - 1)^2 over a: sum over layers, closed form
        weighted += slope / measured * (1.0 - fixed / measured)
        weights += (slope / measured) ** 2
    latency = weighted / weights
    if latency <= 0:
        return None
    return bandwidth, latency


# --- assembling the cluster --------------------------------------------------------------------------


def _median_over_ranks(results: list[dict], pick) -> float:
    return statistics.median(pick(result) for result in results)


def shared_host_profile(ranks: int, results: list[dict], host: dict, dtype: str = "fp32",
                        fast: bool = False) -> tuple[SharedHostProfile, dict]:
    """The SharedHostProfile of k = `ranks` from every rank's measurements (and a summary of them).
    CPU ranks share the host's RAM and cores; a GPU rank has its own device memory."""
    devices = [result["device"] for result in results]
    overhead = statistics.median(device["op_overhead_s"] for device in devices)
    gemm = [
        (*sample[:3], statistics.median(device["gemm"][index][3] for device in devices))
        for index, sample in enumerate(devices[0]["gemm"])
    ]
    elementwise = [
        (sample[0], statistics.median(device["elementwise"][index][1] for device in devices))
        for index, sample in enumerate(devices[0]["elementwise"])
    ]
    rate, operand_bandwidth, _ = fit_gemm(gemm)
    bandwidth, _ = fit_bandwidth(elementwise)
    on_gpu = devices[0].get("device_type") == "cuda"
    threads = devices[0]["threads"]
    if on_gpu:
        name, memory_gib, power = f"{devices[0]['device_name']} ({dtype})", devices[0]["device_memory_gib"], 400.0
    else:
        name = (f"{host['cpu']} ({ranks} rank{'s' if ranks > 1 else ''} sharing {host['cores']} cores, "
                f"{threads} thread{'s' if threads > 1 else ''} each, {dtype})")
        memory_gib, power = host["memory_gib"] / ranks, HOST_POWER_WATTS / ranks
    device = DeviceSpec(
        name=name,
        peak_tflops=rate / 1e12,
        memory_gib=memory_gib,
        memory_bandwidth_gb_per_s=bandwidth / 1e9,
        power_watts=power,
        matmul_efficiency=1.0,
        matmul_operand_bandwidth_gb_per_s=operand_bandwidth / 1e9,
        memory_bandwidth_efficiency=1.0,
        kernel_overhead_us=overhead * 1e6,
        attention_kernel="explicit",
        dropout_ns_per_element=_median_over_ranks(results, lambda r: r["device"]["dropout_ns_per_element"]),
        optimizer_ns_per_parameter=_median_over_ranks(results, lambda r: r["device"]["optimizer_ns_per_parameter"]),
        value_bytes=VALUE_BYTES[dtype],
    )
    layers = [(statistics.median(d["reference_layers"][index][0] for d in devices),
               statistics.median(d["reference_layers"][index][1] for d in devices))
              for index in range(len(devices[0]["reference_layers"]))]
    layer_seconds = [without for without, _ in layers]
    references = GPU_REFERENCE_LAYERS if on_gpu else REFERENCE_LAYERS
    tinies = [d.get("tiny_layer") for d in devices if d.get("tiny_layer")]
    if tinies:  # fixed per-layer costs first: the bandwidth fit below then sees them as fixed
        device = fit_layer_overheads(device, tuple(statistics.median(t[index] for t in tinies) for index in range(3)))
    layer_bandwidth = fit_layer_bandwidth(device, layer_seconds, references) if layers else None
    if layer_bandwidth is not None:
        device = replace(device, memory_bandwidth_gb_per_s=layer_bandwidth / 1e9)
    calls = (device.dropout_call_overhead_us or 0.0) * 1e-6 * len(layers)  # fixed per layer, fitted above
    extra = sum(with_dropout - without for without, with_dropout in layers) - calls
    if layers and extra > 0:  # dropout as it runs inside a layer, per dropped element
        elements = sum(dropped_elements(hidden, heads, seq, batch) for hidden, heads, _, seq, batch in references)
        device = replace(device, dropout_ns_per_element=extra / elements * 1e9)
    if ranks > 1:  # the late rank's collectives; a lone point-to-point message is faster (kept in the raw data)
        link_bandwidth, latency = fit_link([sample for sample in results[-1]["link"] if sample[0] != "p2p"])
    else:  # one rank never communicates: an in-memory copy
        link_bandwidth, latency = bandwidth, 0.0
    tensor_layers = [statistics.median(d["tensor_layers"][index] for d in devices)
                     for index in range(len(devices[0].get("tensor_layers", [])))]
    tensor_fit = fit_tensor_link(device, ranks, tensor_layers, link_bandwidth) if ranks > 1 else None
    profile = SharedHostProfile(ranks=ranks, device=device, bandwidth_gb_per_s=link_bandwidth / 1e9,
                                latency_us=latency * 1e6,
                                tensor_bandwidth_gb_per_s=tensor_fit[0] / 1e9 if tensor_fit else None,
                                tensor_latency_us=tensor_fit[1] * 1e6 if tensor_fit else None)
    summary = {"ranks": ranks, "device_type": devices[0].get("device_type", "cpu"), "threads_per_rank": threads,
               "op_overhead_us": overhead * 1e6,
               "gemm_seconds": gemm, "elementwise_seconds": elementwise,
               "elementwise_block_gb_per_s": bandwidth / 1e9, "reference_layer_seconds": layers,
               "dropout_benchmark_ns_per_element": _median_over_ranks(
                   results, lambda r: r["device"]["dropout_ns_per_element"]),
               "collective_seconds": results[-1]["link"], "tensor_layer_seconds": tensor_layers,
               "tiny_layer_seconds": [d.get("tiny_layer") for d in devices]}
    return profile, summary


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def host_facts() -> dict:
    """CPU model name, core count and RAM of this machine (no measurement)."""
    cpu = cpu_model_name()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 8.0
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "memory_gib": memory}


def build_cluster(profiles: list[SharedHostProfile], host: dict, gpus: bool = False) -> ClusterSpec:
    """The local cluster: one 'node' holding up to max(k) ranks; its top-level device and links
    are those of the smallest and the largest k (`for_world_size` picks per plan). CPU ranks
    share the host's cores (`host_cores`); GPU ranks each have their own device."""
    profiles = sorted(profiles, key=lambda profile: profile.ranks)
    largest = profiles[-1]
    single = profiles[0]
    name = single.device.name if gpus else f"{host['cpu']} ({host['cores']} cores, ranks share them)"
    return ClusterSpec(
        name="local",
        device=replace(single.device, name=name),
        devices_per_node=largest.ranks,
        intra_node_bandwidth_gb_per_s=largest.bandwidth_gb_per_s,
        inter_node_bandwidth_gb_per_s=largest.bandwidth_gb_per_s,
        intra_node_latency_us=largest.latency_us,
        inter_node_latency_us=largest.latency_us,
        num_devices=largest.ranks,
        network_efficiency=1.0,
        shared_host=tuple(profiles),
        host_cores=None if gpus else host["cores"],
    )
