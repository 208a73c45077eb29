"""Alpha-beta collective costs and the placement rule, against hand-computed numbers."""

from __future__ import annotations

import pytest

from modelpar.planner import comm
from modelpar.planner.comm import Link
from modelpar.planner.constants import NETWORK_EFFICIENCY
from modelpar.runtime.mesh import ParallelDims, rank_groups
from modelpar.specs.cluster import CLUSTER_PRESETS, ClusterSpec, DeviceSpec
from modelpar.specs.errors import SpecError

GB = 1e9
LINK = Link(bandwidth=100 * GB, latency_s=5e-6, crosses_nodes=False)
DGX = CLUSTER_PRESETS["dgx-a100-80gb"]  # 8 GPUs, 300 GB/s NVLink per GPU, 200 GB/s per node


def test_ring_all_reduce_by_hand():
    # 8 ranks, 1 GB: 2 * 7/8 * 1e9 / 1e11 = 17.5 ms, plus 2 * 7 * 5 us = 70 us.
    assert comm.all_reduce_time(1e9, 8, LINK) == pytest.approx(0.0175 + 70e-6, rel=1e-12)


def test_all_gather_and_reduce_scatter_by_hand():
    # 4 ranks, 400 MB result: 3/4 * 4e8 / 1e11 = 3 ms, plus 3 * 5 us.
    assert comm.all_gather_time(4e8, 4, LINK) == pytest.approx(0.003 + 15e-6, rel=1e-12)
    assert comm.reduce_scatter_time(4e8, 4, LINK) == pytest.approx(0.003 + 15e-6, rel=1e-12)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    assert comm.all_reduce_time(3e8, 16, LINK) == pytest.approx(
        comm.reduce_scatter_time(3e8, 16, LINK) + comm.all_gather_time(3e8, 16, LINK)
    )


def test_p2p_by_hand():
    assert comm.p2p_time(2e8, LINK) == pytest.approx(0.002 + 5e-6, rel=1e-12)


def test_single_rank_costs_nothing():
    assert comm.all_reduce_time(1e9, 1, LINK) == 0.0
    assert comm.all_gather_time(1e9, 1, LINK) == 0.0


def test_bad_input_is_spec_error():
    with pytest.raises(SpecError):
        comm.all_reduce_time(-1.0, 4, LINK)
    with pytest.raises(SpecError):
        comm.all_gather_time(1.0, 0, LINK)
    with pytest.raises(SpecError):
        comm.group_link(DGX, 0, 1)


def test_tensor_group_inside_a_node_uses_nvlink():
    link = comm.tensor_link(DGX, 8)
    assert not link.crosses_nodes
    assert link.bandwidth == pytest.approx(300 * GB * NETWORK_EFFICIENCY)
    assert link.latency_s == pytest.approx(DGX.intra_node_latency_us * 1e-6)


def test_data_parallel_ring_with_one_member_per_node_gets_one_nic():
    # t x p = 8: every data-parallel group has one GPU per node; 8 groups share the node's
    # 200 GB/s, each through its own 25 GB/s NIC (Narayanan et al. 2021 Sec. 5.6).
    link = comm.data_link(DGX, 8, 1, 4)
    assert link.crosses_nodes
    assert link.bandwidth == pytest.approx(25 * GB * NETWORK_EFFICIENCY)
    assert link.latency_s == pytest.approx(DGX.inter_node_latency_us * 1e-6)


def test_group_with_several_members_per_node_shares_their_nics():
    # t = 4, p = 1, d = 4: data groups are ranks {0, 4, 8, 12}: two members per node -> 2 NICs.
    assert comm.data_link(DGX, 4, 1, 4).bandwidth == pytest.approx(50 * GB * NETWORK_EFFICIENCY)
    # A tensor group of 16 over two nodes: 8 members per node, all 8 NICs: 200 GB/s.
    assert comm.tensor_link(DGX, 16).bandwidth == pytest.approx(200 * GB * NETWORK_EFFICIENCY)


def test_group_spanning_nodes_never_beats_intra_node_bandwidth():
    fat = ClusterSpec("fat-nics", DGX.device, 8, 100.0, 10_000.0)
    assert comm.tensor_link(fat, 16).bandwidth == pytest.approx(100 * GB * NETWORK_EFFICIENCY)


def test_small_data_group_inside_one_node_stays_on_nvlink():
    # t = 2, p = 1, d = 4: span 8 ranks, one node.
    link = comm.data_link(DGX, 2, 1, 4)
    assert not link.crosses_nodes


def test_pipeline_link_inside_and_across_nodes():
    assert not comm.pipeline_link(DGX, 2, 4).crosses_nodes  # 8 ranks: one node
    across = comm.pipeline_link(DGX, 8, 2)
    assert across.crosses_nodes
    assert across.bandwidth == pytest.approx(25 * GB * NETWORK_EFFICIENCY)


def test_misaligned_tensor_group_counts_as_spanning_nodes():
    assert comm.tensor_link(DGX, 3).crosses_nodes  # groups {6, 7, 8} straddle two nodes


@pytest.mark.parametrize("t,p,d", [(2, 2, 4), (4, 2, 2), (8, 4, 2), (1, 4, 8)])
def test_strides_match_the_runtime_mesh(t, p, d):
    """The cost model's strides (tensor 1, pipeline t, data t x p) are the runtime mesh's order."""
    groups = rank_groups(ParallelDims(tensor=t, pipeline=p, data=d))
    for kind, stride, size in (("tensor", 1, t), ("pipeline", t, p), ("data", t * p, d)):
        for ranks in groups[kind]:
            assert ranks == [ranks[0] + stride * k for k in range(size)]


def test_node_placement_of_the_tpu_pod():
    pod = CLUSTER_PRESETS["tpu-v4"]  # a "node" is a 3072-chip pod
    assert not comm.tensor_link(pod, 12).crosses_nodes
    palm_data = comm.data_link(pod, 12, 1, 512)  # 6144 chips over two pods
    assert palm_data.crosses_nodes
    # 256 members per pod x 5062/3072 GB/s = 422 GB/s > 268 GB/s ICI: ICI limits.
    assert palm_data.bandwidth == pytest.approx(268 * GB * NETWORK_EFFICIENCY)


def test_device_spec_unused_fields_do_not_matter():
    slow = ClusterSpec("slow", DeviceSpec("x", 1.0, 1.0, 1.0), 4, 10.0, 4.0)
    # one member per node: 4 GB/s per node over 4 devices = 1 GB/s per NIC
    assert comm.data_link(slow, 4, 1, 2).bandwidth == pytest.approx(1 * GB * NETWORK_EFFICIENCY)
