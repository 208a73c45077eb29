"""What a training rank measures for the predicted-vs-measured comparison (`report.comparison`).

- Collective timers (`timed_collectives`): every torch.distributed collective the rank issues
  becomes a 'collective' TimelineEvent (a blocking call, or the `wait()` of an asynchronous one).
  Tensor-parallel collectives run inside the forward/backward spans of the schedule actions (between
  the GEMMs of a layer, or overlapped with them); timing them separately is what lets compute
  and communication be told apart.
- Saved activations (`ActivationTracker`): during each pipeline chunk's forward, a
  `saved_tensors_hooks` pack hook keeps a weak reference to every tensor autograd saves; when the
  forward returns, the distinct storages still alive (parameters excluded) are what that
  (chunk, micro-batch) holds until its backward (the definition of `models.memory_probe`). The
  schedule's order of forwards and backwards gives the peak of their sum over the step.
- Model-state bytes (`model_state_bytes`): parameters, gradients (and data-parallel bucket
  buffers) and optimizer states, counted exactly from the tensors that hold them.

On CPU the peak memory of a rank is model states + peak saved activations (the resident set
size also holds the interpreter, torch and transient buffers, a few hundred MB that no model
predicts); on CUDA it is the allocator's peak.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from modelpar.schedules.events import COLLECTIVE_KIND, LAUNCH_KIND
from modelpar.schedules.actions import BACKWARD, FORWARD

TIMED_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor",
                     "reduce_scatter_tensor", "broadcast")


class _TimedWork:
    """An asynchronous collective's handle whose `wait()` is recorded as a 'collective' span."""

    def __init__(self, work, timeline, label: str) -> None:
        self._work, self._timeline, self._label = work, timeline, label

    def wait(self, *args, **kwargs):
        with self._timeline.span(COLLECTIVE_KIND, self._label):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


@contextlib.contextmanager
def timed_collectives(timeline) -> Iterator[None]:
    """Record each torch.distributed collective of this process on `timeline` while the context
    is open (torch.distributed's functions are restored on exit): a blocking one as a
    'collective' span; an asynchronous one (async_op=True) as a zero-length 'collective_launch'
    event when it is launched and a 'collective' span around its `wait()`.

    Labels are "<name> <ranks of the group> #<n>": the n-th collective this process launched on
    that group. Every member launches the same sequence on a group, so equal labels on different
    ranks are the same collective (`report.comparison.collective_waits` uses that to split a
    span into waiting for the last member to arrive and the transfer itself).
    """
    originals = {name: getattr(dist, name) for name in TIMED_COLLECTIVES if hasattr(dist, name)}
    counts: dict[tuple[int, ...], int] = {}
    members: dict[int, tuple[int, ...]] = {}

    def group_ranks(group) -> tuple[int, ...]:
        key = id(group)
        if key not in members:
            members[key] = (tuple(range(dist.get_world_size())) if group is None
                            else tuple(dist.get_process_group_ranks(group)))
        return members[key]

    def timed(name, collective):
        def wrapper(*args, **kwargs):
            ranks = group_ranks(kwargs.get("group"))
            counts[ranks] = counts.get(ranks, 0) + 1
            label = f"{name} {','.join(map(str, ranks))} #{counts[ranks]}"
            if kwargs.get("async_op"):
                with timeline.span(LAUNCH_KIND, label):
                    pass
                work = collective(*args, **kwargs)
                return _TimedWork(work, timeline, label) if work is not None else None
            with timeline.span(COLLECTIVE_KIND, label):
                return collective(*args, **kwargs)

        return wrapper

    for name, collective in originals.items():
        setattr(dist, name, timed(name, collective))
    try:
        yield
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class ActivationTracker:
    """Saved-for-backward bytes of every chunk forward, and their peak over a step's schedule.

    `attach(chunks)` hooks the chunks' forwards; the tracker records, per chunk, the bytes each
    forward left saved (in forward order: every schedule runs a chunk's micro-batches in order).
    `peak_bytes(actions)` replays a step's actions (Action objects, in execution order): +bytes at
    F(c, i), -bytes at B(c, i).
    """

    def __init__(self, excluded: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_storage_key(tensor) for tensor in excluded}
        self.saved_bytes: dict[int, list[int]] = {}
        self._pending: list[weakref.ref] = []
        self._contexts: list = []
        self._handles: list = []

    def attach(self, chunks: Iterable[nn.Module]) -> None:
        for index, chunk in enumerate(chunks):
            self._handles.append(chunk.register_forward_pre_hook(self._enter))
            self._handles.append(chunk.register_forward_hook(lambda module, args, output, index=index:
                                                             self._exit(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._pending.append(weakref.ref(tensor))
        return tensor

    def _enter(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        context.__enter__()
        self._contexts.append(context)

    def _exit(self, chunk: int) -> None:
        if not self._contexts:
            return
        self._contexts.pop().__exit__(None, None, None)
        seen, total = set(), 0
        for reference in self._pending:
            tensor = reference()
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.excluded or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        self._pending.clear()
        self.saved_bytes.setdefault(chunk, []).append(total)

    def peak_bytes(self, actions) -> int:
        """Peak of the saved bytes held at once over one step's `actions`; clears the record."""
        queues = {chunk: list(values) for chunk, values in self.saved_bytes.items()}
        held = {}
        current = peak = 0
        for action in actions:
            key = (action.chunk, action.micro_batch)
            if action.kind == FORWARD and queues.get(action.chunk):
                held[key] = queues[action.chunk].pop(0)
                current += held[key]
                peak = max(peak, current)
            elif action.kind == BACKWARD:
                current -= held.pop(key, 0)
        self.saved_bytes.clear()
        return peak


def _tensors_in(value, depth: int = 2) -> Iterator[torch.Tensor]:
    """Tensors held by `value`: itself, in lists/tuples/dicts, or in attributes of plain objects
    (up to `depth` levels of objects)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth)
    elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        for item in vars(value).values():
            yield from _tensors_in(item, depth - 1)


def _unique_bytes(tensors: Iterable[torch.Tensor], exclude: set[int]) -> int:
    seen, total = set(exclude), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def model_state_bytes(modules: nn.Module, optimizer, reducers=()) -> dict[str, int]:
    """Exact bytes of this rank's parameters, gradients (and gradient bucket buffers) and
    optimizer states (every tensor the optimizer holds that is not a parameter or gradient).
    Call after a backward pass, before the optimizer clears the gradients."""
    params = list(modules.parameters())
    parameter_keys = {_storage_key(p) for p in params}
    parameters = _unique_bytes(params, set())
    grads = [p.grad for p in params if p.grad is not None]
    gradients = _unique_bytes([*grads, *_tensors_in(list(reducers or ()))], parameter_keys)
    gradient_keys = {_storage_key(g) for g in grads}
    optimizer_states = _unique_bytes(_tensors_in(optimizer), parameter_keys | gradient_keys)
    return {"parameters": parameters, "gradients": gradients, "optimizer_states": optimizer_states}
