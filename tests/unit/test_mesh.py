"""Rank grids without any process group."""

from __future__ import annotations

import itertools

import pytest

from modelpar.runtime.mesh import ParallelDims, coordinates, global_rank, group_of, rank_groups
from modelpar.specs.errors import SpecError
from modelpar.specs.plan import ParallelPlan

DIMS = [ParallelDims(1, 1, 1), ParallelDims(2, 1, 1), ParallelDims(2, 2, 2), ParallelDims(4, 2, 1),
        ParallelDims(2, 4, 2), ParallelDims(8, 4, 3), ParallelDims(1, 3, 5)]


def test_rank_formula_tensor_innermost():
    dims = ParallelDims(tensor=2, pipeline=4, data=2)
    assert global_rank(dims, data_idx=0, pipeline_idx=0, tensor_idx=1) == 1
    assert global_rank(dims, data_idx=0, pipeline_idx=1, tensor_idx=0) == 2
    assert global_rank(dims, data_idx=1, pipeline_idx=0, tensor_idx=0) == 8
    assert global_rank(dims, data_idx=1, pipeline_idx=3, tensor_idx=1) == 15


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_coordinates_invert_the_rank_formula(dims):
    seen = set()
    for d, p, t in itertools.product(range(dims.data), range(dims.pipeline), range(dims.tensor)):
        rank = global_rank(dims, d, p, t)
        assert coordinates(dims, rank) == (d, p, t)
        seen.add(rank)
    assert seen == set(range(dims.world_size))


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_each_kind_partitions_the_world(dims):
    groups = rank_groups(dims)
    sizes = {"tensor": dims.tensor, "pipeline": dims.pipeline, "data": dims.data, "model": dims.tensor * dims.pipeline}
    for kind, size in sizes.items():
        members = [rank for group in groups[kind] for rank in group]
        assert sorted(members) == list(range(dims.world_size)), kind
        assert all(len(group) == size for group in groups[kind]), kind
        assert all(group == sorted(group) for group in groups[kind]), kind


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_groups_vary_exactly_one_coordinate(dims):
    groups = rank_groups(dims)
    varying = {"tensor": 2, "pipeline": 1, "data": 0}
    for kind, axis in varying.items():
        for group in groups[kind]:
            coords = [coordinates(dims, rank) for rank in group]
            for other in {0, 1, 2} - {axis}:
                assert len({c[other] for c in coords}) == 1, (kind, group)
            assert [c[axis] for c in coords] == list(range(len(group))), (kind, group)


def test_worked_example_16_ranks():
    groups = rank_groups(ParallelDims(tensor=2, pipeline=4, data=2))
    assert groups["tensor"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert groups["pipeline"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["data"][:2] == [[0, 8], [1, 9]]
    assert groups["model"] == [list(range(8)), list(range(8, 16))]
    assert group_of(ParallelDims(2, 4, 2), "pipeline", 11) == [9, 11, 13, 15]


def test_tensor_groups_are_adjacent_ranks():
    for group in rank_groups(ParallelDims(tensor=8, pipeline=2, data=2))["tensor"]:
        assert group == list(range(group[0], group[0] + 8))


def test_from_plan_and_world_size():
    dims = ParallelDims.from_plan(ParallelPlan(tensor_parallel=4, pipeline_parallel=2, data_parallel=3))
    assert dims == ParallelDims(4, 2, 3) and dims.world_size == 24


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_degree_is_spec_error(bad):
    with pytest.raises(SpecError, match="tensor must be a positive integer"):
        ParallelDims(tensor=bad)


def test_out_of_range_rank_is_spec_error():
    with pytest.raises(SpecError, match="rank 8 out of range"):
        coordinates(ParallelDims(2, 2, 2), 8)
    with pytest.raises(SpecError, match="pipeline index 2 out of range"):
        global_rank(ParallelDims(2, 2, 2), 0, 2, 0)
