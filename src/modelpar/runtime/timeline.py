"""Per-rank timing of the runtime: `Timeline` collects `TimelineEvent` spans (compute, receive
waits, send launches, gradient sync, optimizer, collectives) on `time.perf_counter()` seconds; on
CUDA the spans are CUDA events on the current stream (a CPU clock would only see kernel launches),
converted to the same clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch





@dataclass(frozen=True)
class TimelineEvent:
    """One timed interval on a rank: `action` like 'F(chunk 0, micro-batch 3)', `kind` one of
    'compute', 'recv' (waiting for an input), 'send' (launching one), 'send_wait' (end of step),
    'grad_sync', 'optimizer'. Times are `time.perf_counter()` seconds (one clock per machine)."""

    action: str
    start: float
    end: float
    kind: str

    def as_tuple(self) -> tuple[str, float, float, str]:
        return (self.action, self.start, self.end, self.kind)


class Timeline:
    """Collects TimelineEvents; `span(action, kind)` is a context manager that records one.

    After `use_cuda(device)` the spans are CUDA events on the current stream, resolved (one
    device synchronisation) when `events` is read; the times stay perf_counter seconds."""

    def __init__(self) -> None:
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

    def span(self, action: str, kind: str) -> "_Span":
        return _Span(self, action, kind)

    def total(self, kind: str) -> float:
        return sum(e.end - e.start for e in self.events if e.kind == kind)


class _Span:
    def __init__(self, timeline: Timeline, action: str, kind: str) -> None:
        self.timeline, self.action, self.kind = timeline, action, kind

    def __enter__(self) -> None:
        clock = self.timeline.clock
        self.start = clock.mark() if clock is not None else time.perf_counter()

    def __exit__(self, *exc) -> None:
        clock = self.timeline.clock
        if clock is not None:
            clock.pending.append((self.action, self.start, clock.mark(), self.kind))
        else:
            self.timeline._events.append(TimelineEvent(self.action, self.start, time.perf_counter(), self.kind))


class _CudaClock:
    """CUDA events mapped onto perf_counter: a reference event is recorded on an idle device
    (just synchronised) next to a perf_counter reading; an event's time is that reading plus
    its elapsed time from the reference."""

    def __init__(self, device, event_factory: Callable | None = None, synchronize: Callable | None = None) -> None:
        self.device = torch.device(device)
        self._new_event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(self.device))
        self._reference = None  # (perf_counter seconds, event)
        self.pending: list[tuple] = []  # (action, start event, end event, kind)

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
        resolved = [TimelineEvent(action, seconds + reference.elapsed_time(start) / 1e3,
                                  seconds + reference.elapsed_time(end) / 1e3, kind)
                    for action, start, end, kind in self.pending]
        self.pending.clear()
        self._reference = None  # re-anchor at the next span: the two clocks drift apart slowly
        return resolved


