"""The /diagnostics level rules of issue 24: a dead engine worker is ERROR with its reason; a
stamp jump or size mismatch is a WARN that says what happened while it keeps happening."""

from diagnostic_msgs.msg import DiagnosticStatus

from fvs_ros.ros import diagnostics
from fvs_ros.ros.intake import IntakeCounters


def test_a_dead_worker_is_error_with_its_reason():
    level, message = diagnostics.Health().level(
        IntakeCounters(), stopped=True, problems=["the LLM worker stopped: ValueError: x"]
    )
    assert (
        level == DiagnosticStatus.ERROR and message == "engine stopped: the LLM worker stopped: ValueError: x"
    )


def test_a_counter_that_rose_gives_its_note_and_one_that_never_did_gives_none():
    recent = diagnostics.Recent()
    assert recent.problem(0, None) == ""
    assert recent.problem(1, "frame stamp 5.000 s went back") == "frame stamp 5.000 s went back"
    assert (
        recent.problem(1, "frame stamp 5.000 s went back") == "frame stamp 5.000 s went back"
    )  # within 10 s
    level, message = diagnostics.Health().level(IntakeCounters(), False, [recent.problem(1, "went back")])
    assert (level, message) == (DiagnosticStatus.WARN, "went back")
