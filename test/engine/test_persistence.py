"""Crash-safe memory files (issue 15): SIGKILL at random points of a save, field-by-field checks of
engine.json, unreadable saves refused, restored sizes against configured ones. Engine level, CPU,
tiny random checkpoint; the node uses this same save/load code (test_node_robustness.py checks it
over DDS)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import test_engine

from fvs_ros.common import files
from fvs_ros.common.files import move_aside
from fvs_ros.engine import EngineConfig
from fvs_ros.engine.persistence import (
    MARKER,
    ForeignPath,
    NothingSaved,
    SavedStateError,
    check_ours,
    read_saved,
)
from fvs_ros.engine.watch import Watcher, WatchError
from fvs_ros.memory import MemoryConfig

ckpts, lm, make_engine = test_engine.ckpts, test_engine.lm, test_engine.make_engine  # shared fixtures
feed = test_engine.feed
ONE = EngineConfig(sample_fps=0, frames_per_slot=1)  # one frame per slot: counts are frames

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def saved(lm, make_engine, tmp_path):
    """A directory holding a save of 6 frames."""
    eng = make_engine(lm, ONE)
    feed(eng, 6)
    eng.flush()
    return eng.save(tmp_path / "saved", extra={"frames_received": 9})


def test_save_writes_one_memory_file_named_by_the_index_and_load_returns_extra(lm, make_engine, saved):
    index, memory_file = read_saved(saved)
    assert index["format"] == 2 and memory_file.name == index["memory_file"]
    assert sorted(p.name for p in saved.iterdir()) == sorted([MARKER, "engine.json", memory_file.name])
    eng = make_engine(lm, ONE)
    assert eng.load(saved) == {"frames_received": 9} and eng.snapshot().frames_seen == 6
    feed(eng, 2, t0=10.0)
    eng.flush()
    eng.save(saved)  # a second save replaces the memory file
    assert len([p for p in saved.iterdir() if p.suffix == ".pt"]) == 1
    assert make_engine(lm, ONE).load(saved) == {} and eng.snapshot().frames_seen == 8


def test_sigkill_at_random_points_of_a_save_restores_the_old_or_the_new_memory(
    lm, make_engine, ckpts, tmp_path
):
    """50 children saving in a loop, each SIGKILLed at a random moment (half of them within a save
    they reported starting): a restart always finds a complete save, the last one reported done or
    the one being written, never nothing or a mix; and many kills did land inside a save."""
    seeds = []
    for n in (4, 7):
        eng = make_engine(lm, ONE)
        feed(eng, n, seed=n)
        eng.flush()
        seeds.append(eng.save(tmp_path / f"seed{n}"))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "test" / "support" / "kill_during_save.py"),
            str(ckpts["flash_vstream"]),
            *map(str, seeds),
            str(tmp_path / "target"),
            "--kills",
            "50",
            "--seed",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    rounds = report["rounds"]
    assert report["frames"] == [4, 7] and len(rounds) == 50
    bad = [r for r in rounds if not r["ok"]]
    assert not bad, bad
    inside = [r for r in rounds if r["inside_save"]]
    aimed_inside = sum(r["aimed"] for r in inside)
    newer = sum(r["restored"] != r["reported"] for r in inside)
    leftovers = sum(len(r["files"]) > 2 for r in rounds)
    print(
        f"50 kills: {len(inside)} inside a save ({aimed_inside} of 25 aimed), {newer} of them restored the "
        f"save being written, {leftovers} left a partial file behind"
    )
    # aimed kills fall within a typical save's duration after its start: most land inside one
    assert aimed_inside >= 10, [(r["delay"], r["inside_save"]) for r in rounds if r["aimed"]]
    assert rounds[-1]["restored"] is not None


def _rewrite_index(path: Path, **changes):
    index = json.loads((path / "engine.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            index[outer][inner] = value
        else:
            index[key] = value
    (path / "engine.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"source_size": "640x480"}, "source_size must be null or"),
        ({"frame_size": [112, -1]}, "frame_size must be null or"),
        ({"frame_size": None}, "both be set or both null"),
        ({"clock.last": "late"}, "clock.last must be a finite number"),
        ({"clock.last": 1e300}, "clock.last 1e\\+300 s is outside"),  # issue 24 item 8b: finite, absurd
        ({"clock.source": [0.0, 1e300]}, "clock.source stamp 1e\\+300 s is outside"),
        ({"clock.offsets": [[0.0, None]]}, "clock.offsets offset must be a finite number"),
        ({"clock.last": 0.0}, "its clock \\(0.0\\) is behind its memory's newest stamp"),
        ({"first_stamp": 1e300}, "first_stamp 1e\\+300 s is outside"),
        ({"next_due": True}, "next_due must be a finite number"),
        ({"counters": [1, 2]}, "counters must be an object"),
        ({"counters.frames_in": "10"}, "counters.frames_in must be an integer"),
        ({"counters.frames_in": -3}, "counters.frames_in must be an integer"),
        ({"counters.last_update_s": [1]}, "counters.last_update_s must be a finite number"),
        ({"counters.surprise": 1}, "unknown counter 'surprise'"),
        ({"extra": 5}, "extra must be an object"),
        ({"format": 99}, "format 99"),
        ({"memory_file": "../../etc/passwd"}, "is not a memory file name"),
        ({"memory_file": "memory-1.pt"}, "names memory-1.pt, which is missing"),
    ],
)
def test_engine_json_with_wrong_fields_is_refused_and_the_engine_keeps_its_memory(
    lm,
    make_engine,
    saved,
    changes,
    match,
):
    """Issue 15 case 4: a wrong field type used to restore "OK" and crash at the first frame."""
    _rewrite_index(saved, **changes)
    eng = make_engine(lm, ONE)
    feed(eng, 3)
    eng.flush()
    with pytest.raises(SavedStateError, match=match):
        eng.load(saved)
    assert eng.snapshot().frames_seen == 3  # untouched
    feed(eng, 1, t0=5.0)
    eng.flush()
    assert eng.snapshot().frames_seen == 4 and eng.stats().errors == 0


@pytest.mark.parametrize("damage", ["empty index", "truncated index", "garbage memory", "empty memory"])
def test_unreadable_saves_raise_saved_state_error(lm, make_engine, saved, damage):
    index, memory_file = read_saved(saved)
    text = (saved / "engine.json").read_text()
    if damage == "empty index":
        (saved / "engine.json").write_text("")
    elif damage == "truncated index":
        (saved / "engine.json").write_text(text[: len(text) // 2])
    elif damage == "garbage memory":
        memory_file.write_bytes(b"\x00garbage" * 100)
    else:
        memory_file.write_bytes(b"")
    with pytest.raises(SavedStateError):
        make_engine(lm, ONE).load(saved)


def test_nothing_saved_is_not_an_error_and_move_aside_keeps_the_files(lm, make_engine, saved, tmp_path):
    eng = make_engine(lm, ONE)
    with pytest.raises(NothingSaved):
        eng.load(tmp_path / "never_saved")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingSaved):
        eng.load(tmp_path / "empty")
    Watcher(directory=tmp_path / "conditions_only").add("a dog", 0.5)  # watch.json before any save
    with pytest.raises(NothingSaved):
        eng.load(tmp_path / "conditions_only")
    files = sorted(p.name for p in saved.iterdir())
    aside = move_aside(saved)
    assert not saved.exists() and aside.name.startswith("saved.unreadable-")
    assert sorted(p.name for p in aside.iterdir()) == files
    assert move_aside(saved) is None


def test_format_1_saves_still_load(lm, make_engine, saved):
    """The layout before crash-safe saves: memory.pt beside an engine.json that does not name it."""
    index, memory_file = read_saved(saved)
    memory_file.rename(saved / "memory.pt")
    del index["memory_file"], index["clock"], index["extra"]
    index["counters"].pop("stamp_jumps")
    index["counters"].pop("frame_size_mismatches")
    index["last_stamp"] = 0.5  # format 1 and 2 saved the stream time and one offset
    (saved / "engine.json").write_text(json.dumps({**index, "format": 1}))
    eng = make_engine(lm, ONE)
    assert eng.load(saved) == {} and eng.snapshot().frames_seen == 6


def test_restored_memory_of_other_sizes_wins_until_reset(lm, make_engine, saved, caplog):
    eng = make_engine(lm, ONE, memory=MemoryConfig(csm_slots=2, dam_frames=1))
    eng.load(saved)  # saved with the checkpoint's sizes
    assert eng.memory_config.csm_slots != 2 and eng.snapshot().frames_seen == 6
    assert "restored memory has csm_slots" in caplog.text and "until reset" in caplog.text
    feed(eng, 2, t0=10.0)
    eng.flush()
    assert eng.snapshot().frames_seen == 8 and eng.stats().errors == 0
    eng.reset()
    assert (eng.memory_config.csm_slots, eng.memory_config.dam_frames) == (2, 1)
    feed(eng, 6, t0=20.0)
    eng.flush()
    assert len(eng.snapshot().csm_weights) == 2 and eng.stats().errors == 0


def test_a_memory_of_another_input_size_is_refused(lm, make_engine, saved):
    _rewrite_index(saved, frame_size=[100, 100])  # not a size this model's rule produces
    with pytest.raises(SavedStateError, match="resizes to"):
        make_engine(lm, ONE).load(saved)


@pytest.mark.parametrize("changes", [{"last_stamp": 1e300}, {"stamp_offset": -1e300}])
def test_a_save_from_before_the_stream_clock_with_an_absurd_stamp_is_refused(lm, make_engine, saved, changes):
    """Issue 24 item 8b: an engine.json whose last_stamp was 1e300 passed the check (it is finite),
    was restored, and the next answer could not be serialized: the worker died. A range rule
    (what a ROS time holds) refuses it at restore."""
    index = json.loads((saved / "engine.json").read_text())
    del index["clock"]
    index.update({"last_stamp": 0.5, "stamp_offset": 0.0, **changes})
    (saved / "engine.json").write_text(json.dumps(index))
    eng = make_engine(lm, ONE)
    with pytest.raises(SavedStateError, match="outside"):
        eng.load(saved)
    del index[next(iter(changes))]
    (saved / "engine.json").write_text(json.dumps({**index, "last_stamp": 0.5}))
    assert eng.load(saved) == {"frames_received": 9} and eng.snapshot().frames_seen == 6


ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


def test_a_save_on_a_full_file_system_says_no_space_left_simulated(lm, make_engine, saved, monkeypatch):
    """Issue 24 item 17: a full disk was reported as torch's "[enforce fail at inline_container.cc]
    unexpected pos". Simulated: the memory file's write() raises a real OSError(ENOSPC) once 4 KiB
    are written (test_a_save_on_a_full_tmpfs... checks a real full file system where it can mount)."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, ENOSPC_TEXT)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def opener(fd, mode="r", *args, **kw):
        f = real_fdopen(fd, mode, *args, **kw)
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # atomic_write's temporary file
        return FullDisk(f) if "b" in mode and name.startswith(".tmp-memory") else f

    monkeypatch.setattr(files.os, "fdopen", opener)
    eng = make_engine(lm, ONE)
    eng.load(saved)
    with pytest.raises(OSError) as err:
        eng.save(saved)
    assert err.value.errno == errno.ENOSPC and ENOSPC_TEXT in str(err.value)
    monkeypatch.undo()
    assert make_engine(lm, ONE).load(saved) == {"frames_received": 9}  # the previous save is intact


def test_a_save_on_a_full_tmpfs_says_no_space_left(lm, make_engine, saved, tmp_path):
    """The same on a real full file system: a 64 KiB tmpfs (needs the right to mount: root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the simulated test covers it"
        )
    try:
        eng = make_engine(lm, ONE)
        eng.load(saved)
        with pytest.raises(OSError) as err:
            eng.save(mount / "memory")
        assert err.value.errno == errno.ENOSPC and ENOSPC_TEXT in str(err.value)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_save_never_writes_through_a_planted_symlink(lm, make_engine, saved, tmp_path, monkeypatch):
    """Issue 24 item 9: the temporary file had a predictable name (.tmp-<file>.<pid>) opened with
    open(..., "w"): a symlink planted there made the save overwrite the file it points to. Links at
    the old name, at a random-looking one, at the random name the writer draws first (forced) and
    at engine.json itself: the linked file is untouched and engine.json is a regular file."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = [f".tmp-engine.json.{os.getpid()}", ".tmp-engine.json.k3j9x2ab", ".tmp-engine.json.drawn"]
    for name in planted:
        (saved / name).symlink_to(victim)
    (saved / "engine.json").unlink()
    (saved / "engine.json").symlink_to(victim)
    names = iter(["drawn", "fresh1", "fresh2", "fresh3"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)  # collide with a planted link
    eng = make_engine(lm, ONE)
    feed(eng, 2)
    eng.flush()
    eng.save(saved)
    assert victim.read_text() == "precious"
    index = saved / "engine.json"
    assert index.is_file() and not index.is_symlink() and json.loads(index.read_text())["format"] == 2
    assert make_engine(lm, ONE).load(saved) == {} and not list(saved.glob(".tmp-engine.json.fresh*"))


def test_memory_file_of_someone_else_is_never_read_moved_or_written(lm, make_engine, tmp_path):
    """Issue 24 item 10: a directory holding no save of ours (or a plain file) was moved aside and
    replaced. Now load and save refuse it (ForeignPath naming it) and leave every byte as it was."""
    foreign = tmp_path / "etc"
    foreign.mkdir()
    (foreign / "hostname").write_text("robot\n")
    plain = tmp_path / "notes.txt"
    plain.write_text("my notes")
    eng = make_engine(lm, ONE)
    feed(eng, 2)
    eng.flush()
    for path in (foreign, plain):
        with pytest.raises(ForeignPath, match=str(path)):
            eng.load(path)
        with pytest.raises(ForeignPath, match="leaves it as it is"):
            eng.save(path)
        with pytest.raises(WatchError, match="leaves it as it is"):
            Watcher(directory=path).add("a dog is on the sofa", 0.5)
    assert sorted(p.name for p in foreign.iterdir()) == ["hostname"]
    assert (foreign / "hostname").read_text() == "robot\n" and plain.read_text() == "my notes"


def test_what_is_ours(lm, make_engine, saved, tmp_path):
    """Ours: a missing path, an empty directory, one with the marker, or (saved before the marker)
    one with an engine.json or watch.json of our formats; nothing else."""
    check_ours(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_ours(tmp_path / "empty")
    assert (saved / MARKER).is_file()  # every save claims its directory
    check_ours(saved)
    (saved / MARKER).unlink()
    check_ours(saved)  # an older save: engine.json of ours
    (saved / "engine.json").write_text("{broken")
    with pytest.raises(ForeignPath, match=f"add an empty {MARKER}"):
        check_ours(saved)
    legacy = tmp_path / "conditions"
    legacy.mkdir()
    (legacy / "watch.json").write_text(json.dumps({"format": 1, "conditions": []}))
    check_ours(legacy)


def test_conditions_without_a_memory_save_are_nothing_saved_not_unreadable(lm, make_engine, tmp_path):
    """Issue 24 item 15b: a directory holding only watch.json (conditions added before the first
    memory save) raised SavedStateError, and the node moved it aside with the conditions. engine.json
    is the commit point: without it a directory of ours holds no memory yet."""
    memory = tmp_path / "memory"
    Watcher(directory=memory).add("a dog is on the sofa", 0.5)
    assert sorted(p.name for p in memory.iterdir()) == [MARKER, "watch.json"]
    with pytest.raises(NothingSaved):
        make_engine(lm, ONE).load(memory)
    (memory / "memory-1.pt").write_bytes(b"a first save killed before its commit")
    with pytest.raises(NothingSaved):
        make_engine(lm, ONE).load(memory)
    assert Watcher(directory=memory).load() == 1
