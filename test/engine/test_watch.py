"""The watcher core (fvs_ros/engine/watch.py): conditions, validation, hysteresis, persistence.
No ROS, no model."""

import json
import math

import pytest

from fvs_ros.engine.persistence import claim
from fvs_ros.engine.watch import MAX_CONDITION_CHARS, WATCH_FILE, Condition, Watcher, WatchError


def test_add_list_remove():
    w = Watcher(max_conditions=3)
    door = w.add("a person is at the door", 0.7, name="door")
    smoke = w.add("  smoke is visible  ", 0.5)
    assert smoke == Condition("smoke is visible", "smoke is visible", 0.5)  # no name: the text names it
    assert w.conditions() == [door, smoke]
    assert w.remove("door") == door
    assert w.conditions() == [smoke]
    with pytest.raises(WatchError, match="no condition named 'door'.*'smoke is visible'"):
        w.remove("door")


@pytest.mark.parametrize(
    "text, threshold, message",
    [
        ("", 0.5, "condition is empty"),
        ("   ", 0.5, "condition is empty"),
        (" ?? ", 0.5, "condition is empty"),
        (None, 0.5, "condition is empty"),
        ("x" * (MAX_CONDITION_CHARS + 1), 0.5, "characters; the limit is"),
        ("a cat", -0.01, r"threshold must be in \[0, 1\]"),
        ("a cat", 1.5, r"threshold must be in \[0, 1\]"),
        ("a cat", math.nan, "threshold must be a number"),
        ("a cat", math.inf, "threshold must be a number"),
        ("a cat", True, "threshold must be a number"),
        ("a cat", "0.5", "threshold must be a number"),
    ],
)
def test_bad_conditions_are_refused(text, threshold, message):
    w = Watcher()
    w.add("a dog", 0.5)
    with pytest.raises(WatchError, match=message):
        w.add(text, threshold)
    assert [c.text for c in w.conditions()] == ["a dog"]


def test_cap_and_duplicate_names():
    w = Watcher(max_conditions=2)
    w.add("a", 0.5)
    with pytest.raises(WatchError, match="already watched"):
        w.add("another text", 0.5, name="a")
    w.add("b", 0.0)
    with pytest.raises(WatchError, match="already watching 2 conditions, the limit"):
        w.add("c", 0.5)
    w.remove("a")
    w.add("c", 1.0)  # thresholds 0 and 1 are valid
    assert [c.name for c in w.conditions()] == ["b", "c"]


def test_bad_settings():
    for kwargs in ({"max_conditions": 0}, {"max_conditions": 1.5}, {"hysteresis": -0.1}, {"hysteresis": 1.0}):
        with pytest.raises(ValueError):
            Watcher(**kwargs)


def test_hysteresis():
    """Rise at p >= threshold, fall at p < threshold - hysteresis, nothing in between."""
    w = Watcher(hysteresis=0.1)
    c = w.add("a person is at the door", 0.6)
    events = []
    for version, p in enumerate([0.5, 0.6, 0.55, 0.51, 0.9, 0.49, 0.59, 0.3, 0.65]):
        for e in w.update([(c, p)], stamp=10.0 + version, memory_version=version):
            events.append((version, e.rising, e.probability, e.stamp, e.memory_version))
    assert events == [
        (1, True, 0.6, 11.0, 1),
        (5, False, 0.49, 15.0, 5),
        (8, True, 0.65, 18.0, 8),
    ]
    (state,) = w.states()
    assert state.active and state.probability == 0.65 and state.stamp == 18.0


def test_a_removed_or_replaced_condition_is_not_updated():
    w = Watcher()
    old = w.add("a person is at the door", 0.5, name="door")
    w.remove("door")
    assert w.update([(old, 0.9)], 1.0, 1) == []
    new = w.add("a person is at the gate", 0.5, name="door")
    assert w.update([(old, 0.9)], 1.0, 1) == []  # evaluated before the replacement
    assert [e.condition for e in w.update([(new, 0.9)], 2.0, 2)] == [new]


def test_reset_makes_conditions_rise_again():
    w = Watcher()
    c = w.add("a", 0.5)
    assert len(w.update([(c, 0.9)], 1.0, 1)) == 1
    assert w.update([(c, 0.9)], 2.0, 2) == []
    w.reset()
    assert [e.rising for e in w.update([(c, 0.9)], 3.0, 3)] == [True]


def test_persistence_across_restart(tmp_path):
    w = Watcher(directory=tmp_path / "memory")
    door = w.add("a person is at the door", 0.7, name="door")
    smoke = w.add("smoke is visible", 0.2)
    assert w.update([(door, 0.8), (smoke, 0.1)], 5.0, 3)[0].rising
    again = Watcher(directory=tmp_path / "memory")
    assert again.load() == 2
    assert again.conditions() == [door, smoke]
    assert [s.active for s in again.states()] == [True, False]
    assert again.update([(door, 0.8)], 6.0, 4) == []  # was true before the restart: no second rise
    assert [e.rising for e in again.update([(door, 0.1)], 7.0, 5)] == [False]
    again.remove("door")
    third = Watcher(directory=tmp_path / "memory")
    assert third.load() == 1 and third.conditions() == [smoke]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "memory").iterdir())


def test_nothing_saved_means_no_conditions(tmp_path):
    assert Watcher(directory=tmp_path / "none").load() == 0
    assert Watcher().load() == 0  # no directory: nothing persists


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "JSONDecodeError"),
        ('{"format": 99, "conditions": []}', "not a format-1 watch file"),
        (
            '{"format": 1, "conditions": [{"name": "a", "text": "a", "threshold": 2, "active": false}]}',
            r"\[0, 1\]",
        ),
        (
            '{"format": 1, "conditions": [{"name": "a", "text": "", "threshold": 0.5, "active": false}]}',
            "empty",
        ),
        ('{"format": 1, "conditions": [{"name": "a", "text": "a", "threshold": 0.5}]}', "'active'"),
        ('{"format": 1, "conditions": [{"text": "a", "threshold": 0.5, "active": false}]}', "KeyError"),
    ],
)
def test_bad_file_is_refused_and_changes_nothing(tmp_path, content, message):
    w = Watcher(directory=tmp_path)
    w.add("a dog", 0.5)
    (tmp_path / WATCH_FILE).write_text(content)
    with pytest.raises(WatchError, match=message):
        w.load()
    assert [c.text for c in w.conditions()] == ["a dog"]


def test_a_failed_save_changes_nothing(tmp_path):
    w = Watcher(directory=tmp_path)
    c = w.add("a dog", 0.5)
    (tmp_path / WATCH_FILE).unlink()
    (tmp_path / WATCH_FILE).mkdir()  # the file cannot be replaced now
    with pytest.raises(WatchError, match="cannot save"):
        w.add("a cat", 0.5)
    with pytest.raises(WatchError, match="cannot save"):
        w.remove("a dog")
    assert w.conditions() == [c]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_file_format(tmp_path):
    w = Watcher(directory=tmp_path)
    w.add("a dog", 0.25, name="dog")
    assert json.loads((tmp_path / WATCH_FILE).read_text()) == {
        "format": 1,
        "conditions": [{"name": "dog", "text": "a dog", "threshold": 0.25, "active": False}],
    }


def test_open_moves_an_unreadable_file_aside_and_keeps_what_it_holds(tmp_path):
    claim(tmp_path)  # a memory directory of the node's (persistence.py) ...
    (tmp_path / WATCH_FILE).write_text("{broken")  # ... whose conditions file got damaged
    w = Watcher()
    held = w.add("added before", 0.5)
    with pytest.raises(WatchError, match=r"moved aside to watch\.json\.unreadable-.*watching the 1"):
        w.open(tmp_path)
    assert w.conditions() == [held]
    (aside,) = tmp_path.glob(f"{WATCH_FILE}.unreadable-*")
    assert aside.read_text() == "{broken"  # kept as it was
    w.add("a dog", 0.5)  # and a new file is written beside it
    saved = json.loads((tmp_path / WATCH_FILE).read_text())["conditions"]
    assert [c["text"] for c in saved] == ["added before", "a dog"]


def test_open_merges_the_saved_conditions_with_those_held(tmp_path):
    """The node's watcher opens memory_file at configure and again at activate; a condition added
    in between (or before a directory was opened at all) is kept and saved with the stored ones,
    replacing a stored one of its name (issue 24)."""
    stored = Watcher(directory=tmp_path)
    stored.add("a box is on the table", 0.5, name="box")
    stored.add("old text", 0.5, name="door")
    w = Watcher()
    door = w.add("a door is open", 0.7, name="door")
    early = w.add("a person waves", 0.5, name="wave")
    assert w.open(tmp_path) == 2
    assert [c.name for c in w.conditions()] == ["box", "door", "wave"]
    assert w.conditions()[1:] == [door, early]
    assert w.open(tmp_path) == 3 and len(w) == 3  # reopened (activate): nothing doubles
    assert Watcher(directory=tmp_path).load() == 3  # and the merged set is what was saved


def test_open_another_directory(tmp_path):
    first = Watcher(directory=tmp_path / "a")
    first.add("a dog", 0.5)
    w = Watcher()
    assert w.open(tmp_path / "a") == 1 and [c.text for c in w.conditions()] == ["a dog"]
    assert w.open(None) == 0 and len(w) == 1  # nowhere to persist: nothing restored, nothing lost
