"""Progress events: library code emits, the CLI draws; a pipe gets whole lines."""
from __future__ import annotations

import io

from rich.console import Console

from retinocli.events import Emitter, Recorder, emitter
from retinocli.reporting.render import EventBars, PlainProgress, event_bars


def test_an_emitter_without_listener_is_silent_and_a_recorder_keeps_order():
    Emitter().started("x", total=3)  # nothing to call, nothing raised
    seen = Recorder()
    say = emitter(seen)
    assert emitter(say) is say
    say.started("copy", total=4, completed=1)
    say.advanced("copy", 2, rate=5.0)
    say.progressed_to("copy", 4)
    say.finished("copy")
    say.message("half done", level="note")
    assert [e.kind for e in seen.events] == ["started", "advanced", "advanced", "finished", "message"]
    assert seen.completed("copy") == 4 and seen.events[1].fields == {"rate": 5.0}
    assert seen.messages == ["half done"] and seen.of("message")[0].level == "note"


def test_in_a_pipe_each_task_ends_in_one_complete_line_and_messages_keep_brackets():
    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=False)
    with event_bars(console, "img") as bars:
        assert isinstance(bars.bar, PlainProgress)
        say = Emitter(bars)
        say.started("prepare", total=3)
        for _ in range(3):
            say.advanced("prepare", rate=12.5)
        say.finished("prepare", rate=12.5)
        say.message("kept [1/2] as is", level="warning")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("prepare: 3/3 img in ") and lines[0].endswith(", 12.5 img/s")
    assert lines[1] == "warning: kept [1/2] as is"


def test_on_a_terminal_the_bar_counts_what_the_events_said():
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    with event_bars(console, "img") as bars:
        say = Emitter(bars)
        say.progressed_to("checking images", 2, total=5)  # no "started": the bar appears anyway
        say.advanced("checking images", 3)
        (task,) = bars.bar.tasks
        assert (task.description, task.completed, task.total) == ("checking images", 5, 5)
    assert isinstance(bars, EventBars)


def test_a_task_that_ends_after_its_count_prints_one_line_however_long_it_takes():
    # an epoch: the count completes, validation runs, then the closing fields arrive
    out = io.StringIO()
    bar = PlainProgress(Console(file=out, width=40), "img", every=0.0)  # a progress line at every update
    bars = EventBars(bar, bar.console)
    say = Emitter(bars)
    say.started("epoch 1/1", total=4, line_at_stop=True)
    say.progressed_to("epoch 1/1", 2)
    say.progressed_to("epoch 1/1", 4)
    say.finished("epoch 1/1", postfix="val qwk 0.5")
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split(" in ")[0] for line in lines] == [" 2/4 img", " 4/4 img"], lines
    assert lines[-1].endswith("| val qwk 0.5")
