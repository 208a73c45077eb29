"""Per-rank timing of the runtime: `Timeline` records `schedules.events.TimelineEvent` spans
(forward/backward compute, receive waits, send launches, gradient sync, optimizer, collectives) on
`time.perf_counter()` seconds; on CUDA the spans are CUDA events on the current stream (a CPU
clock would only see kernel launches), converted to the same clock."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from modelpar.schedules.actions import Action
from modelpar.schedules.events import TimelineEvent


class Timeline:
    """Collects the TimelineEvents of rank `rank`; `span(kind, ...)` is a context manager that
    records one.

    After `use_cuda(device)` the spans are CUDA events on the current stream, resolved (one
    device synchronisation) when `events` is read; the times stay perf_counter seconds."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self._events: list[TimelineEvent] = []
        self.clock: _CudaClock | None = None

    def use_cuda(self, device) -> None:
        if self.clock is None:
            self.clock = _CudaClock(device)

    @property
    def events(self) -> list[TimelineEvent]:
        if self.clock is not None:
            self._events.extend(self.clock.resolve())
        return self._events

    def span(self, kind: str, name: str = "", action: Action | None = None, stage: int | None = None) -> "_Span":
        """A span of `kind`; `action` (and its global `stage`): the schedule action it belongs to,
        which also names it unless `name` does."""
        fields = {"rank": self.rank, "name": name or (str(action) if action is not None else ""), "kind": kind,
                  "stage": stage}
        if action is not None:
            fields.update(micro_batch=action.micro_batch, chunk=action.chunk)
        return _Span(self, fields)

    def total(self, kind: str) -> float:
        return sum(e.duration_s for e in self.events if e.kind == kind)


class _Span:
    def __init__(self, timeline: Timeline, fields: dict) -> None:
        self.timeline, self.fields = timeline, fields

    def __enter__(self) -> None:
        clock = self.timeline.clock
        self.start = clock.mark() if clock is not None else time.perf_counter()

    def __exit__(self, *exc) -> None:
        clock = self.timeline.clock
        if clock is not None:
            clock.pending.append((self.fields, self.start, clock.mark()))
        else:
            self.timeline._events.append(TimelineEvent(start_s=self.start, end_s=time.perf_counter(), **self.fields))


class _CudaClock:
    """CUDA events mapped onto perf_counter: a reference event is recorded on an idle device
    (just synchronised) next to a perf_counter reading; an event's time is that reading plus
    its elapsed time from the reference."""

    def __init__(self, device, event_factory: Callable | None = None, synchronize: Callable | None = None) -> None:
        self.device = torch.device(device)
        self._new_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(self.device))
        self._reference = None  # (perf_counter seconds, event)
        self.pending: list[tuple] = []  # (TimelineEvent fields but the times, start event, end event)

    def mark(self):
        if self._reference is None:
            self._synchronize()
            reference = self._new_event()
            reference.record()
            self._reference = (time.perf_counter(), reference)
        event = self._new_event()
        event.record()
        return event

    def resolve(self) -> list[TimelineEvent]:
        if not self.pending:
            return []
        self._synchronize()
        seconds, reference = self._reference
        resolved = [TimelineEvent(start_s=seconds + reference.elapsed_time(start) / 1e3,
                                  end_s=seconds + reference.elapsed_time(end) / 1e3, **fields)
                    for fields, start, end in self.pending]
        self.pending.clear()
        self._reference = None  # re-anchor at the next span: the two clocks drift apart slowly
        return resolved


