"""Frame flood against the fvs node over DDS: is memory bounded and ~/ask responsive?

    python benchmarks/bench_flood.py [--rate 200] [--duration 30] [--size 480x640] [--memory-fps 1]
                                     [--model DIR] [--transport raw|compressed]

Starts the node (config/fvs.yaml, a tiny random model unless --model) as its own process,
publishes --rate frames/s for --duration s from this one, asks a question every 0.5 s meanwhile,
samples the node's RSS, and prints the figures. Run it with its own ROS_DOMAIN_ID.
"""

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from fvs_ros.cli.ask import wait_for_answers
from fvs_ros.srv import Ask

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="frames per second published")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of flood")
    parser.add_argument("--size", default="480x640", help="HEIGHTxWIDTH of the frames")
    parser.add_argument("--memory-fps", type=float, default=1.0, help="node memory_fps (0: every frame)")
    parser.add_argument("--transport", choices=("raw", "compressed"), default="raw")
    parser.add_argument("--model", help="checkpoint (default: a tiny random model written to a temp dir)")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="fvs_flood_"))
    model = args.model or str(tmp / "tiny")
    if not args.model:
        subprocess.run([sys.executable, "-m", "fvs_ros.model.tiny", model], check=True, capture_output=True)

    log = open(tmp / "node.log", "w")
    node_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fvs_ros.ros.node",
            "--autostart",
            "--ros-args",
            "--params-file",
            str(ROOT / "config" / "fvs.yaml"),
            "-p",
            f"model:={model}",
            "-p",
            f"memory_fps:={args.memory_fps}",
            "-p",
            f"image_transport:={args.transport}",
            "-p",
            "max_new_tokens:=16",
            "-p",
            "diagnostics_period_s:=0.5",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rclpy.init()
    node = rclpy.create_node("fvs_flood")
    if args.transport == "raw":
        pub = node.create_publisher(Image, "/image_raw", qos_profile_sensor_data)
    else:
        pub = node.create_publisher(CompressedImage, "/image_raw/compressed", qos_profile_sensor_data)
    client = node.create_client(Ask, "/fvs/ask")
    executor = SingleThreadedExecutor()
    diagnostics = []
    node.create_subscription(
        DiagnosticArray,
        "/diagnostics",
        lambda m: diagnostics.extend(
            {kv.key: kv.value for kv in s.values} for s in m.status if s.name.startswith("fvs:")
        ),
        10,
    )
    try:
        deadline = time.monotonic() + 300
        while not wait_for_answers(node, client, 2.0):
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the node did not come up; its log: {tmp / 'node.log'}")
        executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()

        frames = [
            np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8) for i in range(8)
        ]
        payloads = (
            [f.tobytes() for f in frames]
            if args.transport == "raw"
            else [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        )
        latencies, failures, rss, stop = [], [], [], threading.Event()

        def asker():
            while not stop.is_set():
                future = client.call_async(Ask.Request(question="What is happening?", timeout_s=20.0))
                t0 = time.monotonic()
                while not future.done() and time.monotonic() - t0 < 30:
                    time.sleep(0.005)
                r = future.result() if future.done() else None
                if r is not None and r.success:
                    latencies.append(r.total_time_s)
                else:
                    failures.append(r.error if r is not None else "no response")
                stop.wait(0.5)

        def sampler():
            while not stop.is_set():
                rss.append(rss_mib(node_proc.pid))
                stop.wait(0.5)

        rss_start = rss_mib(node_proc.pid)
        threads = [threading.Thread(target=asker), threading.Thread(target=sampler)]
        for t in threads:
            t.start()
        n, start = int(args.rate * args.duration), time.monotonic()
        for i in range(n):
            stamp = node.get_clock().now().to_msg()
            if args.transport == "raw":
                msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
            else:
                msg = CompressedImage(format="jpeg")
            msg.header.stamp, msg.data = stamp, payloads[i % len(payloads)]
            pub.publish(msg)
            delay = start + (i + 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elapsed = time.monotonic() - start
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        d = diagnostics[-1] if diagnostics else {}
        lat = sorted(latencies)
        print(
            f"flood: {n} frames {height}x{width} {args.transport} in {elapsed:.1f} s "
            f"({n / elapsed:.0f} frames/s sent, target {args.rate:g}), memory_fps {args.memory_fps:g}"
        )
        print(
            f"node:  received {d.get('frames_received')}, into memory {d.get('frames_into_memory')}, "
            f"skipped by sampling {d.get('frames_skipped_by_sampling')}, dropped (queue full) "
            f"{d.get('frames_dropped')}, queue depth "
            f"{d.get('queue_depth')}, slots {d.get('memory_slots_used')}"
        )
        print(
            f"rss:   start {rss_start:.0f} MiB, max {max(rss):.0f} MiB, end {rss[-1]:.0f} MiB, "
            f"growth over the last half {rss[-1] - rss[len(rss) // 2]:+.0f} MiB"
        )
        if lat:
            print(
                f"ask:   {len(lat)} answers, {len(failures)} failed; "
                f"latency p50 {statistics.median(lat):.3f} s, "
                f"p95 {lat[int(0.95 * (len(lat) - 1))]:.3f} s, max {lat[-1]:.3f} s"
            )
        else:
            print(f"ask:   no answers; failures: {failures[:3]}")
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(30)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        log.close()


if __name__ == "__main__":
    main()
