"""Process-group mesh: which global ranks form each tensor, pipeline and data group.

Rank order (Megatron-LM's default, picotron's ``arange(world).view(d, p, t)``): tensor innermost,
so the t ranks of a tensor group are adjacent (same node, fastest links), then pipeline, then data:

    rank = ((data_idx * p) + pipeline_idx) * t + tensor_idx

The pure part (ParallelDims, coordinates, rank_groups) needs no torch and no process group.
`ParallelContext` is built once per process after ``init_process_group`` and passed explicitly to
every layer; there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpar.specs.errors import SpecError

GROUP_KINDS = ("tensor", "pipeline", "data", "model")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor (t), pipeline (p) and data (d) parallelism; world size = t * p * d."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "data"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"parallel dims: {name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @classmethod
    def from_plan(cls, plan) -> "ParallelDims":
        return cls(tensor=plan.tensor_parallel, pipeline=plan.pipeline_parallel, data=plan.data_parallel)


def global_rank(dims: ParallelDims, data_idx: int, pipeline_idx: int, tensor_idx: int) -> int:
    """rank = ((data_idx * p) + pipeline_idx) * t + tensor_idx."""
    for name, index, size in (("data", data_idx, dims.data), ("pipeline", pipeline_idx, dims.pipeline),
                              ("tensor", tensor_idx, dims.tensor)):
        if not 0 <= index < size:
            raise SpecError(f"parallel dims: {name} index {index} out of range 0..{size - 1}")
    return (data_idx * dims.pipeline + pipeline_idx) * dims.tensor + tensor_idx


def coordinates(dims: ParallelDims, rank: int) -> tuple[int, int, int]:
    """(data_idx, pipeline_idx, tensor_idx) of a global rank; inverse of `global_rank`."""
    if not 0 <= rank < dims.world_size:
        raise SpecError(f"parallel dims: rank {rank} out of range 0..{dims.world_size - 1}")
    tensor_idx = rank % dims.tensor
    pipeline_idx = (rank // dims.tensor) % dims.pipeline
    data_idx = rank // (dims.tensor * dims.pipeline)
    return data_idx, pipeline_idx, tensor_idx


def rank_groups(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """Every group of each kind, as sorted lists of global ranks, in a fixed order.

    tensor: ranks differing only in tensor_idx; pipeline: only in pipeline_idx; data: only in
    data_idx; model: one data replica (all tensor x pipeline ranks with the same data_idx).
    Each kind partitions the world. The order is the same on every rank, which is what
    ``new_group`` needs.
    """
    t, p, d = dims.tensor, dims.pipeline, dims.data
    return {
        "tensor": [[global_rank(dims, di, pi, ti) for ti in range(t)] for di in range(d) for pi in range(p)],
        "pipeline": [[global_rank(dims, di, pi, ti) for pi in range(p)] for di in range(d) for ti in range(t)],
        "data": [[global_rank(dims, di, pi, ti) for di in range(d)] for pi in range(p) for ti in range(t)],
        "model": [[global_rank(dims, di, pi, ti) for pi in range(p) for ti in range(t)] for di in range(d)],
    }


def group_of(dims: ParallelDims, kind: str, rank: int) -> list[int]:
    """The global ranks of `rank`'s group of the given kind."""
    for ranks in rank_groups(dims)[kind]:
        if rank in ranks:
            return ranks
    raise SpecError(f"parallel dims: rank {rank} out of range 0..{dims.world_size - 1}")


class ParallelContext:
    """This process's place in the mesh and its process groups. Build once, pass everywhere.

    Must be constructed on every rank, after ``torch.distributed.init_process_group``, with the
    same dims: it calls ``new_group`` for every group of every kind in the same order on all
    ranks (a collective requirement), keeping the ones this rank belongs to.

    Attributes: rank, world_size, dims, backend ("nccl" or "gloo"), device (cuda:<local rank>
    under NCCL, else cpu), tensor_group / pipeline_group / data_group / model_group, their
    member lists tensor_ranks / pipeline_ranks / data_ranks (global ranks), and this rank's
    tensor_rank / pipeline_rank / data_rank within them.
    """

    def __init__(self, dims: ParallelDims, device=None):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ParallelContext needs torch.distributed.init_process_group first "
                               "(use modelpar.runtime.launch.spawn or torchrun)")
        self.dims = dims
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != dims.world_size:
            raise SpecError(
                f"parallel dims {dims.tensor}x{dims.pipeline}x{dims.data} (t x p x d) need "
                f"{dims.world_size} ranks but the process group has {self.world_size}; change the degrees"
            )
        self.backend = str(dist.get_backend())
        if device is None:
            if "nccl" in self.backend:  # "nccl", or a per-device string such as "cpu:gloo,cuda:nccl"
                from modelpar.runtime.launch import local_cuda_device

                device = local_cuda_device(self.rank)  # normally already current (launch sets it before init)
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives and all_gather_object use the current device
        self.data_rank, self.pipeline_rank, self.tensor_rank = coordinates(dims, self.rank)

        groups = rank_groups(dims)
        for kind in GROUP_KINDS:
            for ranks in groups[kind]:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    setattr(self, f"{kind}_group", group)
                    setattr(self, f"{kind}_ranks", list(ranks))

    # -- pipeline neighbours (global ranks); the ring wraps, as interleaved schedules need --------
    @property
    def next_pipeline_rank(self) -> int:
        return self.pipeline_ranks[(self.pipeline_rank + 1) % self.dims.pipeline]

    @property
    def prev_pipeline_rank(self) -> int:
        return self.pipeline_ranks[(self.pipeline_rank - 1) % self.dims.pipeline]

    @property
    def is_first_pipeline_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pipeline_rank == self.dims.pipeline - 1

    def __repr__(self) -> str:
        return (f"ParallelContext(rank={self.rank}/{self.world_size}, t={self.tensor_rank}/{self.dims.tensor}, "
                f"p={self.pipeline_rank}/{self.dims.pipeline}, d={self.data_rank}/{self.dims.data}, "
                f"backend={self.backend}, device={self.device})")
