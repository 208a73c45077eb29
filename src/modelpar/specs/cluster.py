"""Device and cluster specifications and presets.

Bandwidths are per direction. `intra_node_bandwidth_gb_per_s` is per device (what one device can
push into the node's fabric); `inter_node_bandwidth_gb_per_s` is per node (the sum of its NICs).
For TPU pods a "node" is one pod: its chips talk over ICI, pods over the data-centre network.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from modelpar.specs.errors import SpecError
from modelpar.specs.fields import check_fields


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator."""

    name: str = field(metadata={"doc": "Device name, e.g. 'A100-SXM4-80GB'."})
    peak_tflops: float = field(metadata={"doc": "Dense 16-bit (bf16/fp16) peak, TFLOP/s."})
    memory_gib: float = field(metadata={"doc": "Device memory, GiB."})
    memory_bandwidth_gb_per_s: float = field(metadata={"doc": "Device memory bandwidth, GB/s."})
    power_watts: float = field(default=400.0, metadata={"doc": "Board power under training load, W."})
    # Measured properties (`modelpar profile`). None: the planner's global constant
    # (`planner.constants`, fitted on GPUs) or its fused-kernel GPU model.
    matmul_efficiency: float | None = field(
        default=None, metadata={"doc": "Share of peak_tflops a large GEMM sustains (None: MATMUL_EFFICIENCY)."}
    )
    matmul_operand_bandwidth_gb_per_s: float | None = field(
        default=None,
        metadata={"doc": "Rate at which a GEMM reads/packs its operands, GB/s (CPU BLAS packing; "
                         "None: memory bandwidth x MEMORY_BANDWIDTH_EFFICIENCY)."},
    )
    memory_bandwidth_efficiency: float | None = field(
        default=None, metadata={"doc": "Share of memory_bandwidth_gb_per_s elementwise kernels reach "
                                       "(None: MEMORY_BANDWIDTH_EFFICIENCY)."}
    )
    kernel_overhead_us: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "Fixed cost of each kernel / eager op, us (None: KERNEL_OVERHEAD_S)."}
    )
    attention_kernel: str | None = field(
        default=None,
        metadata={"choices": ("fused", "explicit"), "doc": "'fused' (FlashAttention, the default) or 'explicit' (scores and probabilities "
                         "written to memory, as the eager CPU runtime does)."},
    )
    dropout_ns_per_element: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "Time to draw and apply a dropout mask and back-propagate through it, "
                                       "ns per element (None: a 1-byte mask fused into its kernel)."}
    )
    optimizer_ns_per_parameter: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "Time of one AdamW step, ns per local parameter (None: "
                                       "ADAM_BYTES_PER_PARAMETER at memory bandwidth)."}
    )
    layer_forward_overhead_us: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "Fixed seconds (us) of one layer's forward beyond its kernels: module "
                                       "calls and Python-level autograd functions of an eager runtime (measured)."}
    )
    layer_backward_overhead_us: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "The same for one layer's backward (us)."}
    )
    dropout_call_overhead_us: float | None = field(
        default=None, metadata={"bound": "non_negative", "doc": "Fixed us per layer of drawing its dropout masks, beyond the per-element "
                                       "cost (the keyed masks' index arithmetic and generator calls)."}
    )
    value_bytes: int | None = field(
        default=None, metadata={"choices": (2, 4), "doc": "Bytes per activation/weight/gradient value of the precision this "
                                       "device trains in (None: 2, 16-bit mixed precision; 4: fp32)."}
    )

    def __post_init__(self) -> None:
        check_fields(self, f"device '{self.name}'")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


@dataclass(frozen=True)
class SharedHostProfile:
    """What one rank achieves while `ranks` ranks run at once on one host (CPU ranks sharing its
    cores, measured by `modelpar profile`): its device (compute, memory, per-op overhead) and its
    link (alpha-beta fit of collectives among those ranks)."""

    ranks: int = field(metadata={"doc": "Ranks running at once on the host."})
    device: DeviceSpec = field(metadata={"doc": "One rank's device while `ranks` ranks run."})
    bandwidth_gb_per_s: float = field(metadata={"doc": "Per-rank collective bandwidth, GB/s (measured)."})
    latency_us: float = field(metadata={"doc": "Per-message (per ring step) latency, us (measured).",
                                        "bound": "non_negative"})
    tensor_bandwidth_gb_per_s: float | None = field(default=None, metadata={
        "doc": "Collective bandwidth inside tensor-parallel layers, GB/s: fitted so that the cost model "
               "reproduces the runtime's own tensor-parallel layers (`modelpar profile`); None: the link above."})
    tensor_latency_us: float | None = field(default=None, metadata={
        "doc": "Per-message latency of the same fit, us.", "bound": "non_negative"})

    def __post_init__(self) -> None:
        if (self.tensor_bandwidth_gb_per_s is None) != (self.tensor_latency_us is None):
            raise SpecError(f"shared_host ranks={self.ranks}: give both tensor_bandwidth_gb_per_s and "
                            f"tensor_latency_us, or neither")
        check_fields(self, f"shared_host ranks={self.ranks}")


def scale_rates(device: DeviceSpec, factor: float) -> DeviceSpec:
    """`device` with its throughputs multiplied and its per-operation times divided by `factor`
    (a measured shared-host device's rates with the cores to itself: factor = ranks / cores)."""
    def divided(value: float | None) -> float | None:
        return None if value is None else value / factor

    def multiplied(value: float | None) -> float | None:
        return None if value is None else value * factor

    return replace(device, peak_tflops=device.peak_tflops * factor,
                   memory_bandwidth_gb_per_s=device.memory_bandwidth_gb_per_s * factor,
                   matmul_operand_bandwidth_gb_per_s=multiplied(device.matmul_operand_bandwidth_gb_per_s),
                   kernel_overhead_us=divided(device.kernel_overhead_us),
                   dropout_ns_per_element=divided(device.dropout_ns_per_element),
                   optimizer_ns_per_parameter=divided(device.optimizer_ns_per_parameter),
                   layer_forward_overhead_us=divided(device.layer_forward_overhead_us),
                   layer_backward_overhead_us=divided(device.layer_backward_overhead_us),
                   dropout_call_overhead_us=divided(device.dropout_call_overhead_us))


@dataclass(frozen=True)
class ClusterSpec:
    """Identical devices grouped in nodes: a fast intra-node fabric, a slower inter-node network."""

    name: str = field(metadata={"doc": "Cluster name, used in reports."})
    device: DeviceSpec = field(metadata={"doc": "The accelerator every rank runs on."})
    devices_per_node: int = field(metadata={"doc": "Devices sharing the intra-node fabric (NVLink/NVSwitch/ICI)."})
    intra_node_bandwidth_gb_per_s: float = field(
        metadata={"doc": "Per-device, one-direction bandwidth inside a node, GB/s."}
    )
    inter_node_bandwidth_gb_per_s: float = field(
        metadata={"doc": "Per-node, one-direction bandwidth between nodes (sum of NICs), GB/s."}
    )
    intra_node_latency_us: float = field(default=5.0, metadata={"doc": "Per-message latency inside a node, us.",
                                                                "bound": "non_negative"})
    inter_node_latency_us: float = field(default=10.0, metadata={"doc": "Per-message latency between nodes, us.",
                                                                 "bound": "non_negative"})
    num_devices: int | None = field(
        default=None, metadata={"doc": "Devices available; None means as many as asked for."}
    )
    network_efficiency: float | None = field(
        default=None, metadata={"doc": "Share of the nominal bandwidths collectives achieve (None: "
                                       "NETWORK_EFFICIENCY; 1 for measured bandwidths)."}
    )
    shared_host: tuple[SharedHostProfile, ...] = field(
        default=(),
        metadata={"doc": "Ranks that share one host's cores (`modelpar profile`): the device and links one "
                         "rank sees while k ranks run at once, for each profiled k; `for_world_size` picks one."},
    )
    host_cores: int | None = field(
        default=None,
        metadata={"doc": "Cores the ranks of a shared host time-share (`modelpar profile`); plans with more "
                         "ranks are costed by processor sharing (`planner.shared_host`)."},
    )
    tensor_link: tuple[float, float] | None = field(
        default=None,
        metadata={"doc": "(GB/s, us) of collectives inside tensor-parallel layers when they differ from the "
                         "intra-node link: set by `for_world_size` from a profiled host's fit, None otherwise."},
    )

    def __post_init__(self) -> None:
        check_fields(self, f"cluster '{self.name}'")
        ranks = [profile.ranks for profile in self.shared_host]
        if len(set(ranks)) != len(ranks):
            raise SpecError(f"cluster '{self.name}': shared_host lists ranks {ranks}; each count at most once")

    def for_world_size(self, num_devices: int) -> "ClusterSpec":
        """The cluster as a plan of `num_devices` ranks sees it.

        Without `shared_host` profiles: unchanged. With them (ranks sharing one host's cores): the
        link (collective bandwidth and latency) of the smallest profiled k >= num_devices (the
        largest k when none is) in place of the intra-node one, every group inside the host; and
        the device of that profile (and its tensor-parallel link, `tensor_link`, when profiled),
        except with more ranks than `host_cores`: then that profile's device with every rate
        multiplied by k / host_cores (`scale_rates`: what a rank would achieve with the cores to
        itself, keeping the cache and context-switch costs the k ranks paid, 10-20% on a 2-core
        VM), and the cost model shares the cores itself (`planner.shared_host`).
        """
        if not self.shared_host:
            return self
        profiles = sorted(self.shared_host, key=lambda profile: profile.ranks)
        chosen = next((profile for profile in profiles if profile.ranks >= num_devices), profiles[-1])
        device, host_cores = chosen.device, self.host_cores
        if host_cores is not None and num_devices > host_cores:
            if chosen.ranks > host_cores:  # one rank's rates with the cores to itself, oversubscription costs kept
                device = scale_rates(chosen.device, chosen.ranks / host_cores)
        tensor_link = None
        if chosen.tensor_bandwidth_gb_per_s is not None:
            tensor_link = (chosen.tensor_bandwidth_gb_per_s, chosen.tensor_latency_us)
        return replace(
            self, device=device, intra_node_bandwidth_gb_per_s=chosen.bandwidth_gb_per_s,
            intra_node_latency_us=chosen.latency_us, devices_per_node=max(self.devices_per_node, num_devices),
            shared_host=(), host_cores=host_cores, tensor_link=tensor_link,
        )

    def shares_cores(self, num_devices: int) -> bool:
        """True when `num_devices` ranks outnumber the cores of a shared host (after `for_world_size`)."""
        return self.host_cores is not None and not self.shared_host and num_devices > self.host_cores


# --- devices -----------------------------------------------------------------------------------
# NVIDIA V100 SXM2 32GB datasheet: 125 TFLOP/s fp16 tensor, 900 GB/s HBM2, 300 W.
V100_SXM2 = DeviceSpec("V100-SXM2-32GB", peak_tflops=125.0, memory_gib=32, memory_bandwidth_gb_per_s=900, power_watts=300)
# DGX-2H: V100 SXM3 32GB at 450 W and higher clocks, 130 TFLOP/s fp16 tensor (DGX-2H datasheet).
V100_SXM3_H = DeviceSpec("V100-SXM3-32GB-H", peak_tflops=130.0, memory_gib=32, memory_bandwidth_gb_per_s=900, power_watts=450)
# NVIDIA A100 datasheet: 312 TFLOP/s dense bf16; 40GB: 1555 GB/s; 80GB: 2039 GB/s; SXM 400 W.
A100_40GB = DeviceSpec("A100-SXM4-40GB", peak_tflops=312.0, memory_gib=40, memory_bandwidth_gb_per_s=1555, power_watts=400)
A100_80GB = DeviceSpec("A100-SXM4-80GB", peak_tflops=312.0, memory_gib=80, memory_bandwidth_gb_per_s=2039, power_watts=400)
# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3350 GB/s, 700 W.
H100_SXM = DeviceSpec("H100-SXM5-80GB", peak_tflops=989.0, memory_gib=80, memory_bandwidth_gb_per_s=3350, power_watts=700)
# Google Cloud TPU v3 page: 123 TFLOP/s bf16, 32 GiB HBM2 at 900 GB/s, mean power 220 W.
TPU_V3 = DeviceSpec("TPU-v3", peak_tflops=123.0, memory_gib=32, memory_bandwidth_gb_per_s=900, power_watts=220)
# Google Cloud TPU v4 page: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, mean power 170 W.
TPU_V4 = DeviceSpec("TPU-v4", peak_tflops=275.0, memory_gib=32, memory_bandwidth_gb_per_s=1200, power_watts=170)


CLUSTER_PRESETS: dict[str, ClusterSpec] = {
    # DGX-1 (V100): NVLink 2.0 hybrid cube-mesh, 6 links x 25 GB/s per direction = 150 GB/s per GPU;
    # 4 x 100 Gb/s EDR InfiniBand = 50 GB/s per node.
    "dgx-1-v100": ClusterSpec("dgx-1-v100", V100_SXM2, 8, 150.0, 50.0),
    # DGX-2H as in Shoeybi et al. 2019 Sec. 5: 16 GPUs on NVSwitch (300 GB/s bidirectional, 150 per
    # direction), 8 x 100 Gb/s InfiniBand = 100 GB/s per node.
    "dgx-2h-v100": ClusterSpec("dgx-2h-v100", V100_SXM3_H, 16, 150.0, 100.0),
    # DGX A100: NVLink 3 600 GB/s bidirectional (300 per direction) per GPU through NVSwitch;
    # 8 x 200 Gb/s HDR InfiniBand compute NICs = 200 GB/s per node (Narayanan et al. 2021 Sec. 5).
    "dgx-a100-40gb": ClusterSpec("dgx-a100-40gb", A100_40GB, 8, 300.0, 200.0),
    "dgx-a100-80gb": ClusterSpec("dgx-a100-80gb", A100_80GB, 8, 300.0, 200.0),
    # DGX H100: NVLink 4 900 GB/s bidirectional (450 per direction); 8 x 400 Gb/s NDR = 400 GB/s per node.
    "dgx-h100": ClusterSpec("dgx-h100", H100_SXM, 8, 450.0, 400.0),
    # TPU v3 pod (Cloud TPU v3 page): 1024 chips on a 2D torus, all-reduce bandwidth 340 TB/s per pod
    # = 332 GB/s per chip; pods joined by the data-centre network (Gopher used 4 pods, Rae et al. 2021
    # Sec. 4, "4096 TPUv3 chips"); the DCN figure per pod is the PaLM paper's 81 Tb/s for two v4 pods.
    "tpu-v3": ClusterSpec("tpu-v3", TPU_V3, 1024, 332.0, 5062.0, intra_node_latency_us=2.0, inter_node_latency_us=20.0),
    # TPU v4 pod (Cloud TPU v4 page): 4096 chips on a 3D torus, all-reduce bandwidth 1.1 PB/s per pod =
    # 268 GB/s per chip. PaLM (Chowdhery et al. 2022 Sec. 4) spans 2 pods of 3072 chips, with 81 Tb/s
    # bidirectional cross-pod bandwidth: 40.5 Tb/s = 5062 GB/s per pod per direction.
    "tpu-v4": ClusterSpec("tpu-v4", TPU_V4, 3072, 268.0, 5062.0, intra_node_latency_us=2.0, inter_node_latency_us=20.0),
}
