"""Data parallelism: bucketed gradient all-reduce over the data group, overlapped with backward.

Every data-parallel replica computes the gradient of its own B/d sequences; the step's gradient
is their mean, g = (1/d) sum_k g_k, so that d replicas reproduce one serial step on the full
global batch (each replica's loss is already a mean over its own tokens, and all replicas see the
same number of tokens).

Overlap follows PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating
Data Parallel Training", Sec. 3.2): parameters are grouped into buckets of about
`bucket_bytes` in *reverse* registration order (backward produces the last layer's gradients
first); a post-accumulate-grad hook marks a parameter ready, and a bucket whose parameters are all
ready is all-reduced asynchronously while backward goes on computing earlier layers. Buckets are
launched strictly in index order, so every replica issues the same collectives in the same order
whatever order its hooks fire in. During gradient accumulation (all but the last micro-batch of
the step) the hooks do nothing (Megatron's / DDP's `no_sync`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size, 25 MiB."""


MAIN_GRAD = "main_grad"  # the attribute `precision.MainGradients` gives parameters (fp32 accumulation)


def default_grad_of(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient of `param`: its fp32 ``main_grad`` when it has one (bf16 training,
    `precision.MainGradients`), else ``.grad``."""
    if hasattr(param, MAIN_GRAD):
        return getattr(param, MAIN_GRAD)
    return param.grad


def set_grad(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give `param` the gradient `value` (a copy) where `default_grad_of` reads it: ``main_grad``
    (fp32) or ``.grad`` (the parameter's dtype)."""
    if hasattr(param, MAIN_GRAD):
        setattr(param, MAIN_GRAD, value.detach().to(torch.float32, copy=True))
    else:
        param.grad = value.detach().to(param.dtype, copy=True)


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    ready: int = 0
    work: dist.Work | None = None
    launched: bool = False
    ready_ids: set[int] = field(default_factory=set)


class GradientReducer:
    """All-reduces (averages) the gradients of `params` over `group` in overlapped buckets.

    Usage per step::

        reducer.set_sync(is_last_micro_batch)   # before each backward of these parameters
        loss.backward()                         # buckets launch from the gradient hooks
        reducer.finish()                        # wait; gradients now hold the data-parallel mean

    `grad_of(param)` names the tensor to reduce (default `default_grad_of`: the fp32 ``main_grad``
    in bf16 training, else ``.grad``); the mean is written back into it. The reduction runs in
    fp32 buckets whatever the gradient dtype. With a group of one rank the reducer does nothing.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup | None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        grad_of: Callable[[nn.Parameter], torch.Tensor | None] = default_grad_of,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.grad_of = grad_of
        self.sync = False
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        self._next_to_launch = 0
        self._handles = []
        params = [p for p in params if p.requires_grad]
        if self.world_size == 1:
            return
        self._build_buckets(params, bucket_bytes)
        for param in params:
            self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad_ready))

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    def _build_buckets(self, params: list[nn.Parameter], bucket_bytes: int) -> None:
        current: list[nn.Parameter] = []
        size = 0
        for param in reversed(params):
            current.append(param)
            size += param.numel() * 4  # fp32 bucket
            if size >= bucket_bytes:
                self._add_bucket(current)
                current, size = [], 0
        if current:
            self._add_bucket(current)

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        offsets, total = [], 0
        for param in params:
            offsets.append(total)
            total += param.numel()
        index = len(self.buckets)
        self.buckets.append(_Bucket(params, offsets, torch.zeros(total, dtype=torch.float32,
                                                                  device=params[0].device)))
        for param in params:
            self._bucket_of[id(param)] = index

    def set_sync(self, enabled: bool) -> None:
        """Reduce during the next backward(s) (True: last micro-batch of the step) or not."""
        self.sync = enabled

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self.buckets[self._bucket_of[id(param)]]
        if bucket.launched or id(param) in bucket.ready_ids:
            return
        bucket.ready_ids.add(id(param))
        bucket.ready += 1
        self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_to_launch < len(self.buckets):
            bucket = self.buckets[self._next_to_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next_to_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        for param, offset in zip(bucket.params, bucket.offsets):
            grad = self.grad_of(param)
            view = bucket.buffer[offset: offset + param.numel()]
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad.reshape(-1))
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        bucket.launched = True

    def finish(self) -> None:
        """Launch any bucket not yet launched, wait for all, write the mean back; reset for the next step."""
        if self.world_size == 1:
            return
        while self._next_to_launch < len(self.buckets):
            self._launch(self.buckets[self._next_to_launch])
            self._next_to_launch += 1
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            for param, offset in zip(bucket.params, bucket.offsets):
                mean = bucket.buffer[offset: offset + param.numel()].view_as(param)
                grad = self.grad_of(param)
                if grad is None:
                    set_grad(param, mean)
                else:
                    grad.copy_(mean)
            bucket.work, bucket.launched, bucket.ready = None, False, 0
            bucket.ready_ids.clear()
        self._next_to_launch = 0
        self.sync = False

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def all_reduce_gradients(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None,
                         grad_of: Callable[[nn.Parameter], torch.Tensor | None] = default_grad_of,
                         average: bool = True) -> None:
    """Blocking all-reduce of the gradients of `params` over `group` in one flat fp32 buffer.

    Used where there is nothing to overlap with (tied embedding copies across pipeline stages,
    sequence-parallel norm weights); `average=False` sums (the tied-embedding rule: both copies
    take the sum of their gradients, Shoeybi et al. 2019 / Megatron's embedding group).
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [grad_of(p) for p in params]
    present = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not present:
        return
    flat = torch.cat([g.reshape(-1).float() for _, g in present])
    dist.all_reduce(flat, group=group)
    if average:
        flat.div_(dist.get_world_size(group))
    offset = 0
    for param, grad in present:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
