"""Raw camera intake of the fvs node over DDS: frames seen, frames into memory and node CPU per frame.

    python benchmarks/bench_intake.py [--sizes 480x640,720x1280,1080x1920] [--fps 30] [--seconds 20]
                                      [--intake deserialize,raw] [--reliability reliable] [--flood 60]

For each intake mode (raw: the node reads serialized headers and decodes only the frames its
sampler keeps, `raw_intake: true`; deserialize: rclpy deserializes every message first, the path
before issue 15, `raw_intake: false`) and frame size, starts the node (config/fvs.yaml, a tiny
random model, memory_fps 1, --reliability QoS on both sides) and publishes rgb8 frames at --fps for
--seconds from this process (pre-serialized, only the stamp patched per frame, so the publisher
costs little), then prints what the node counted (/diagnostics) and the CPU time its process used.
--flood S: afterwards, 640x480 rgb8 as fast as this process can publish for S seconds with raw
intake, sampling the node's RSS. Run it with its own ROS_DOMAIN_ID.

Between two processes on the 2-core machine of the README, best-effort large images were mostly
lost inside Fast DDS even for a bare rclpy subscriber (5-18 of 236 640x480 frames at 30 fps, any
FASTDDS_BUILTIN_TRANSPORTS), while reliable delivered 237/237 and 1080p 223/224: hence reliable
by default here.
"""

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy._rclpy_pybind11 import RCLError
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sensor_msgs.msg import Image

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """This process's ROS side: a raw image publisher and a /diagnostics listener."""

    def __init__(self, reliable: bool):
        self.node = rclpy.create_node("bench_intake")
        qos = (
            QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
            if reliable
            else qos_profile_sensor_data
        )
        self.pub = self.node.create_publisher(Image, "/image_raw", qos)
        self.diag: dict = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith("fvs:"):
                self.diag = {kv.key: kv.value for kv in status.values}

    def wait_diag(self, key: str, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if key in self.diag:
                return True
            time.sleep(0.1)
        return False

    def settle(self):
        """The latest diagnostics after the node had time to count everything."""
        time.sleep(1.5)
        return dict(self.diag)

    def publish_for(self, templates, seconds: float, fps: float) -> int:
        """Publish pre-serialized frames (stamp patched to now) at fps (0: as fast as possible)."""
        sent, start = 0, time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            if fps > 0:
                due = start + sent / fps
                if due > now:
                    time.sleep(due - now)
            buf = templates[sent % len(templates)]
            t = time.time()
            buf[4:12] = np.array([int(t), int((t % 1) * 1e9)], "<u4").tobytes()
            try:
                self.pub.publish(bytes(buf))
            except RCLError:  # a RELIABLE writer whose history is full (flood): try the next frame
                time.sleep(0.001)
                continue
            sent += 1
        return sent


def templates_for(height: int, width: int, n: int = 4) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
        msg.header.frame_id = "bench"
        msg.data = rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()
        out.append(bytearray(serialize_message(msg)))
    return out


def start_node(model: str, log: Path, raw: bool, reliability: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "fvs_ros.ros.node", "--autostart", "--ros-args", "--params-file"]
    args += [str(ROOT / "config" / "fvs.yaml")]
    for name, value in {
        "model": model,
        "raw_intake": str(raw).lower(),
        "reliability": reliability,
        "memory_fps": 1.0,
        "summary_period_s": 0.0,
        "diagnostics_period_s": 0.5,
        "csm_slots": 8,
        "dam_frames": 4,
    }.items():
        args += ["-p", f"{name}:={value}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run_one(bench: Bench, model: str, tmp: Path, raw: bool, size, args, flood: float = 0.0):
    mode, fps, seconds = "raw" if raw else "deserialize", args.fps, args.seconds
    proc = start_node(model, tmp / f"node_{mode}_{size[1]}x{size[0]}.log", raw, args.reliability)
    try:
        bench.diag = {}
        if not bench.wait_diag("frames_received"):
            raise RuntimeError("the node did not come up")
        templates = templates_for(*size)
        bench.publish_for(templates, 2.0, fps)  # warm-up: DDS matching, first frame, model size
        before = bench.settle()
        cpu0, rss0 = cpu_seconds(proc.pid), rss_mib(proc.pid)
        sent = bench.publish_for(templates, seconds, fps)
        after = bench.settle()
        cpu = cpu_seconds(proc.pid) - cpu0
        seen = int(after["frames_received"]) - int(before["frames_received"])
        into = int(after["frames_into_memory"]) - int(before["frames_into_memory"])
        print(
            f"{mode:>11} {size[1]:>4}x{size[0]:<4} {fps:>4g} fps: sent {sent:>5}, seen {seen:>5} "
            f"({100 * seen / max(sent, 1):5.1f} %), into memory {into:>3} ({into / seconds:.2f}/s), "
            f"node CPU {cpu / seconds * 100:5.1f} % = {1e3 * cpu / max(seen, 1):6.2f} ms/frame seen, "
            f"RSS {rss0:.0f} -> {rss_mib(proc.pid):.0f} MiB",
            flush=True,
        )
        if flood > 0:
            samples = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < flood:
                sent = bench.publish_for(templates, 5.0, 0.0)
                samples.append((round(time.monotonic() - t0), sent, round(rss_mib(proc.pid))))
            end = bench.settle()
            print(
                f"flood {size[1]}x{size[0]} {mode}, {flood:g} s as fast as this process publishes: "
                f"(t s, frames sent in 5 s, node RSS MiB) {samples}; node saw "
                f"{int(end['frames_received']) - int(after['frames_received'])} frames",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="480x640,720x1280,1080x1920", help="HEIGHTxWIDTH,...")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--intake", default="deserialize,raw", help="modes, in order: deserialize,raw")
    parser.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    parser.add_argument("--flood", type=float, default=0.0, help="seconds of a 640x480 flood (raw intake)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fvs_intake_"))
    model = str(tmp / "tiny")
    subprocess.run([sys.executable, "-m", "fvs_ros.model.tiny", model], check=True, capture_output=True)
    rclpy.init()
    bench = Bench(args.reliability == "reliable")
    try:
        for mode in args.intake.split(","):
            for size in args.sizes.split(","):
                h, w = (int(v) for v in size.split("x"))
                run_one(bench, model, tmp, mode == "raw", (h, w), args)
        if args.flood > 0:
            run_one(bench, model, tmp, True, (480, 640), args, args.flood)
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
