"""Communication costs: alpha-beta (Hockney 1994) collectives on a two-level topology.

Collectives (ring algorithms, Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009), for n
ranks, S bytes per rank (the full buffer of an all-reduce, the full gathered output of an
all-gather, the full input of a reduce-scatter), link bandwidth W bytes/s, per-message latency a:

    all-reduce       2 (n - 1)/n * S / W + 2 (n - 1) a
    all-gather       (n - 1)/n * S / W + (n - 1) a
    reduce-scatter   (n - 1)/n * S / W + (n - 1) a
    point-to-point   S / W + a

Placement. Ranks are laid out as the runtime's mesh (`modelpar.runtime.mesh`):
``rank = ((data_idx * p) + pipeline_idx) * t + tensor_idx`` -- tensor innermost (stride 1),
pipeline next (stride t), data outermost (stride t * p), node = rank // devices_per_node. This is
Megatron-LM's default order for these three dimensions (tp innermost; Narayanan et al. 2021
Sec. 3.3 keep tensor parallelism inside a node). A group of n ranks spaced `stride` apart:

- lies within one node when its span stride x n fits and is aligned (devices_per_node is a
  multiple of stride x n): its ring runs over NVLink/ICI at `intra_node_bandwidth_gb_per_s`
  per device;
- otherwise it spans nodes with k = min(n, devices_per_node // stride) members per node (at
  least 1). Every device has an equal share of its node's NICs (rail-optimised DGX: one NIC per
  GPU), inter_node / devices_per_node, and NCCL runs one ring channel through each member's NIC,
  so the data crossing a node boundary flows through the k NICs of the group's members on that
  node: W = min(intra, k x inter_node / devices_per_node). The devices_per_node / k groups of the
  same kind on that node each use their own members' NICs, so they do not slow each other.
  Example, DGX A100 (8 GPUs, 8 x 25 GB/s HDR NICs = 200 GB/s per node): a data-parallel ring
  with t x p = 8 has one member per node, W = 25 GB/s (the 200 / 8 of Narayanan et al. 2021
  Sec. 5.6); a tensor group of 16 over two nodes has 8 members per node, W = 200 GB/s.

Every bandwidth is multiplied by `NETWORK_EFFICIENCY` (achieved bus bandwidth / nominal), or by
the cluster's own `network_efficiency` when it has one (1 for a profiled machine, whose
bandwidths are measured, `modelpar profile`).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpar.planner.constants import NETWORK_EFFICIENCY
from modelpar.specs.cluster import ClusterSpec
from modelpar.specs.errors import SpecError


@dataclass(frozen=True)
class Link:
    """What one rank of a group gets: achieved bandwidth (bytes/s) and per-message latency (s)."""

    bandwidth: float
    latency_s: float
    crosses_nodes: bool


def _check(num_bytes: float, ranks: int, link: Link) -> None:
    if num_bytes < 0 or ranks < 1 or link.bandwidth <= 0:
        raise SpecError(
            "collective needs bytes >= 0, ranks >= 1 and bandwidth > 0; "
            f"got {num_bytes!r}, {ranks!r}, {link.bandwidth!r}"
        )


def all_reduce_time(num_bytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: 2 (n - 1)/n * S / W + 2 (n - 1) a (Patarasuk & Yuan 2009)."""
    _check(num_bytes, ranks, link)
    if ranks == 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * num_bytes / link.bandwidth + 2 * (ranks - 1) * link.latency_s


def all_gather_time(num_bytes: float, ranks: int, link: Link) -> float:
    """Ring all-gather of an S-byte result: (n - 1)/n * S / W + (n - 1) a (Thakur et al. 2005)."""
    _check(num_bytes, ranks, link)
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * num_bytes / link.bandwidth + (ranks - 1) * link.latency_s


def reduce_scatter_time(num_bytes: float, ranks: int, link: Link) -> float:
    """Ring reduce-scatter of an S-byte input: (n - 1)/n * S / W + (n - 1) a (Thakur et al. 2005)."""
    return all_gather_time(num_bytes, ranks, link)


def p2p_time(num_bytes: float, link: Link) -> float:
    """One point-to-point message: S / W + a."""
    _check(num_bytes, 1, link)
    return num_bytes / link.bandwidth + link.latency_s


def network_efficiency(cluster: ClusterSpec) -> float:
    """Achieved / nominal bandwidth: the cluster's measured value, else NETWORK_EFFICIENCY."""
    return cluster.network_efficiency if cluster.network_efficiency is not None else NETWORK_EFFICIENCY


def group_link(cluster: ClusterSpec, group_size: int, stride: int) -> Link:
    """Bandwidth and latency per rank for a group of `group_size` ranks spaced `stride` apart
    (see the module docstring for the placement rule and the shared-NIC formula)."""
    if group_size < 1 or stride < 1:
        raise SpecError(f"group_size and stride must be positive, got {group_size!r}, {stride!r}")
    per_node = cluster.devices_per_node
    intra = cluster.intra_node_bandwidth_gb_per_s * 1e9
    span = stride * group_size
    if group_size == 1 or (span <= per_node and per_node % span == 0):
        return Link(intra * network_efficiency(cluster), cluster.intra_node_latency_us * 1e-6, False)
    members_per_node = max(1, min(group_size, per_node // stride))
    nic_share = cluster.inter_node_bandwidth_gb_per_s * 1e9 / per_node
    bandwidth = min(intra, members_per_node * nic_share)
    return Link(bandwidth * network_efficiency(cluster), cluster.inter_node_latency_us * 1e-6, True)


def tensor_link(cluster: ClusterSpec, tensor_parallel: int) -> Link:
    """Tensor-parallel group: t consecutive ranks (stride 1). A profiled host may carry its own
    link for collectives issued inside tensor-parallel layers (`ClusterSpec.tensor_link`: on a
    CPU their threads compete with the GEMMs beside them, which an isolated collective does not
    show)."""
    if cluster.tensor_link is not None and tensor_parallel > 1:
        bandwidth_gb_per_s, latency_us = cluster.tensor_link
        return Link(bandwidth_gb_per_s * 1e9, latency_us * 1e-6, False)
    return group_link(cluster, tensor_parallel, 1)


def data_link(cluster: ClusterSpec, tensor_parallel: int, pipeline_parallel: int, data_parallel: int) -> Link:
    """Data-parallel group: d ranks spaced t x p apart."""
    return group_link(cluster, data_parallel, tensor_parallel * pipeline_parallel)


def pipeline_link(cluster: ClusterSpec, tensor_parallel: int, pipeline_parallel: int) -> Link:
    """The slowest link between consecutive pipeline stages (ranks t apart).

    Stage boundaries are within a node when a node holds whole pipelines (t x p <= devices per
    node, aligned). Otherwise some boundary crosses nodes; every device sends its own piece
    (Megatron's scatter/gather: 1/t of the activation per tensor rank) through its share of the
    node's NICs, inter_node / devices_per_node, and that boundary sets the pace.
    """
    per_node = cluster.devices_per_node
    span = tensor_parallel * pipeline_parallel
    if pipeline_parallel == 1 or (span <= per_node and per_node % span == 0):
        intra = cluster.intra_node_bandwidth_gb_per_s * 1e9 * network_efficiency(cluster)
        return Link(intra, cluster.intra_node_latency_us * 1e-6, False)
    nic_share = cluster.inter_node_bandwidth_gb_per_s * 1e9 / per_node
    bandwidth = min(cluster.intra_node_bandwidth_gb_per_s * 1e9, nic_share)
    return Link(bandwidth * network_efficiency(cluster), cluster.inter_node_latency_us * 1e-6, True)
