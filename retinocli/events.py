"""Progress as plain events: what long library work tells whoever is listening.

Library code never draws anything. It holds an :class:`Emitter` and says four things:

    started   a task began (its name, how many items it will take when known)
    advanced  some items of a task are done (and optional fields, such as a running rate)
    finished  a task ended (with its closing fields)
    message   one line for a person (``level`` "info", "note" or "warning")

The CLI turns these into rich bars or plain log lines (``reporting.render.event_listener``);
Python callers pass any callable that takes an :class:`Event`, a :class:`Recorder` to keep
them, or nothing at all. Neither this module nor the code that emits needs a terminal, rich or
torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

STARTED, ADVANCED, FINISHED, MESSAGE = "started", "advanced", "finished", "message"
KINDS = (STARTED, ADVANCED, FINISHED, MESSAGE)


@dataclass(frozen=True)
class Event:
    """One thing a long job says. ``task`` names the bar it belongs to ("" for messages)."""

    kind: str
    task: str = ""
    total: float | None = None
    advance: float = 0
    completed: float | None = None
    fields: Mapping[str, object] = field(default_factory=dict)
    text: str = ""
    level: str = "info"


Listener = Callable[[Event], None]


class Emitter:
    """What library code holds to emit events; with no listener every call does nothing."""

    def __init__(self, listener: Listener | None = None):
        self.listener = listener

    def _emit(self, event: Event) -> None:
        if self.listener is not None:
            self.listener(event)

    def started(self, task: str, total: float | None = None, completed: float = 0, **fields) -> None:
        self._emit(Event(STARTED, task, total=total, completed=completed, fields=fields))

    def advanced(self, task: str, n: float = 1, **fields) -> None:
        self._emit(Event(ADVANCED, task, advance=n, fields=fields))

    def progressed_to(self, task: str, completed: float, total: float | None = None, **fields) -> None:
        """An absolute position rather than a step (for counters that report "done so far")."""
        self._emit(Event(ADVANCED, task, completed=completed, total=total, fields=fields))

    def finished(self, task: str, **fields) -> None:
        self._emit(Event(FINISHED, task, fields=fields))

    def message(self, text: str, level: str = "info") -> None:
        self._emit(Event(MESSAGE, text=text, level=level))


EventsLike = Union[Emitter, Listener, None]


def emitter(events: EventsLike) -> Emitter:
    """An :class:`Emitter` from what a caller passed: an emitter, a listener, or None."""
    if isinstance(events, Emitter):
        return events
    return Emitter(events)


class Recorder:
    """A listener that keeps every event, for Python callers and tests."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: str, task: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == kind and (task is None or e.task == task)]

    def completed(self, task: str) -> float:
        """Where the task's count stands after the events seen so far."""
        done = 0.0
        for e in self.events:
            if e.task != task or e.kind not in (STARTED, ADVANCED):
                continue
            done = e.completed if e.completed is not None else done + e.advance
        return done

    @property
    def messages(self) -> list[str]:
        return [e.text for e in self.of(MESSAGE)]
