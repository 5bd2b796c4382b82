"""Kills a process saving memory at random points, then checks what a restart restores.

    python test/support/kill_during_save.py MODEL SEED_A SEED_B TARGET --kills 50 --seed 0

SEED_A and SEED_B are two saved memories (different frame counts). For each kill this process
forks a child that saves, in a loop, SEED_A or SEED_B into TARGET with StreamEngine.save (the
node's save code), each save tagged with a generation number and reported on a pipe once
complete. The child is SIGKILLed after a random delay, and a fresh engine restores TARGET: it
must hold the last reported generation or the one being written, with that generation's memory.
Forking keeps each round cheap (no interpreter and model start per kill). Prints one JSON line.
"""

import argparse
import json
import os
import random
import select
import signal
import sys
import time
from pathlib import Path

import torch

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model


def child_loop(engine, seeds, target, generation, out_fd):
    """Save generation g = generation, generation + 1, ... until killed; report each when complete."""
    while True:
        engine.load(seeds[generation % 2])
        engine.save(target, extra={"generation": generation})
        os.write(out_fd, f"{generation}\n".encode())
        generation += 1


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
    generation, rounds = 0, []
    for _ in range(args.kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: saves until killed
            os.close(read_fd)
            try:
                child_loop(engine, seeds, target, generation, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        delay = rng.uniform(0.0, args.max_delay)
        buffer, deadline = b"", time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:  # read reports until the kill
            if select.select([read_fd], [], [], left)[0]:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                buffer += chunk
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        buffer += os.read(read_fd, 1 << 16)
        os.close(read_fd)
        done = [int(x) for x in buffer.split()]
        reported = done[-1] if done else None
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
