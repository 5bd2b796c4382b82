"""Kills a process saving memory at random points, then checks what a restart restores.

    python test/support/kill_during_save.py MODEL SEED_A SEED_B TARGET --kills 50 --seed 0

SEED_A and SEED_B are two saved memories (different frame counts). For each kill this process
forks a child that saves, in a loop, SEED_A or SEED_B into TARGET with StreamEngine.save (the
node's save code), each save tagged with a generation number and reported on a pipe when it
starts and once complete. The child is SIGKILLed after a random delay: in even rounds from the
fork, in odd rounds from the report that a save started, within the time a save takes (measured
from the earlier rounds), so that many kills land inside a save. A fresh engine then restores
TARGET: it must hold the last completed generation or the one being written, with that
generation's memory. A round's kill was inside a save when a save had started and was not
reported complete. Forking keeps each round cheap (no interpreter and model start per kill).
Prints one JSON line.
"""

import argparse
import json
import os
import random
import select
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model


def child_loop(engine, seeds, target, generation, out_fd):
    """Save generation g = generation, generation + 1, ... until killed; report "start g" just
    before each save and "done g SECONDS" once it is complete."""
    while True:
        engine.load(seeds[generation % 2])
        os.write(out_fd, f"start {generation}\n".encode())
        t0 = time.monotonic()
        engine.save(target, extra={"generation": generation})
        os.write(out_fd, f"done {generation} {time.monotonic() - t0:.6f}\n".encode())
        generation += 1


def read_reports(fd, buffer: bytes, until: float, stop=None) -> bytes:
    """Reports from the child until monotonic time `until` (or until stop(buffer) holds)."""
    while (left := until - time.monotonic()) > 0 and not (stop and stop(buffer)):
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("seed_a")
    parser.add_argument("seed_b")
    parser.add_argument("target")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.3)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.set_num_threads(1)  # no intra-op thread pool: a forked child would wait on its threads forever
    lm = load_model(args.model)
    engine = StreamEngine(
        lm, config=EngineConfig(sample_fps=0, frames_per_slot=1)
    )  # not started: save/load need no workers
    seeds = [Path(args.seed_a), Path(args.seed_b)]
    frames = []
    for seed in seeds:
        engine.load(seed)
        frames.append(engine.snapshot().frames_seen)
    target = Path(args.target)
    generation, rounds, save_s = 0, [], [0.05]  # durations of completed saves (a first guess)
    for i in range(args.kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: saves until killed
            os.close(read_fd)
            try:
                child_loop(engine, seeds, target, generation, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        aimed = i % 2 == 1
        buffer = b""
        if aimed:  # wait for a save to start (a child loads its seed first), then kill within it
            buffer = read_reports(read_fd, buffer, time.monotonic() + 60, lambda b: b"start" in b)
            started = time.monotonic()
            delay = rng.uniform(0.0, statistics.median(save_s))
        else:
            started, delay = time.monotonic(), rng.uniform(0.0, args.max_delay)
        buffer = read_reports(read_fd, buffer, started + delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        buffer += os.read(read_fd, 1 << 16)
        os.close(read_fd)
        reports = [line.split() for line in buffer.decode().splitlines()]
        done = [int(r[1]) for r in reports if r[0] == "done"]
        save_s += [float(r[2]) for r in reports if r[0] == "done"]
        reported = done[-1] if done else None
        inside = bool(reports) and reports[-1][0] == "start"  # killed between a save's start and end
        fresh = StreamEngine(lm, config=EngineConfig(sample_fps=0, frames_per_slot=1))
        try:
            restored = fresh.load(target)["generation"]
            seen = fresh.snapshot().frames_seen
        except FileNotFoundError:  # nothing saved yet: only before the first completed save
            restored, seen = None, None
        last_complete = reported if reported is not None else generation - 1
        rounds.append(
            {
                "delay": round(delay, 4),
                "aimed": aimed,
                "inside_save": inside,
                "reported": reported,
                "restored": restored,
                "frames_seen": seen,
                "ok": (
                    restored in (last_complete, last_complete + 1)
                    and seen == frames[restored % 2]
                    or (restored is None and last_complete < 0)
                ),
                "files": sorted(p.name for p in target.iterdir()) if target.exists() else [],
            }
        )
        if restored is not None:
            generation = restored + 1
    print(json.dumps({"frames": frames, "rounds": rounds}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
