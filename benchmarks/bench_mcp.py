"""What fvs_mcp adds to an answer: the same question through the MCP bridge and through fvs_ask's
service call, in one run against one node.

    python benchmarks/bench_mcp.py [--questions 50] [--max-new-tokens 8] [--model DIR] [--frames 8]

Starts the node (config/fvs.yaml, a tiny random model unless --model) and fvs_mcp over stdio (the
MCP SDK's stdio_client and ClientSession, as an agent would), sends --frames frames, then asks
the same question alternately through both paths. Each answer's own service time (the node's
total_time_s) is subtracted from its round trip: the rest is transport, and the MCP path's
rest minus the direct path's is the bridge's overhead. Run it with its own ROS_DOMAIN_ID.
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from fvs_ros.cli.ask import wait_for_answers
from fvs_ros.srv import Ask

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is on the table?"


def start_node(model: str, log) -> subprocess.Popen:
    settings = {"model": model, "max_prefix_lag_s": 0.0, "reliability": "reliable", "qos_depth": 10}
    args = [sys.executable, "-m", "fvs_ros.ros.node", "--autostart", "--ros-args"]
    args += ["--params-file", str(ROOT / "config" / "fvs.yaml")]
    for name, value in settings.items():
        args += ["-p", f"{name}:={value}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args, node, client):
    direct_lock = threading.Lock()

    def direct() -> tuple[float, float]:
        """fvs_ask's call: call_async, then spin until the reply; (round trip, node's total_time_s)."""
        with direct_lock:
            request = Ask.Request(question=QUESTION, timeout_s=30.0, max_new_tokens=args.max_new_tokens)
            t0 = time.perf_counter()
            future = client.call_async(request)
            rclpy.spin_until_future_complete(node, future, timeout_sec=60)
            elapsed = time.perf_counter() - t0
            reply = future.result()
            assert reply.success, reply.error
            return elapsed, reply.total_time_s

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "fvs_ros.cli.mcp"], env=dict(os.environ), cwd=ROOT
    )
    rows = {"direct": [], "mcp": []}
    answers = set()
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        arguments = {"question": QUESTION, "max_new_tokens": args.max_new_tokens}
        for k in range(args.questions + 2):  # the first two of each warm up
            rt, service = await asyncio.to_thread(direct)
            t0 = time.perf_counter()
            result = await session.call_tool("ask", arguments)
            mcp_rt = time.perf_counter() - t0
            assert not result.is_error, result.content[0].text
            answers.add(result.structured_content["answer"])
            if k >= 2:
                rows["direct"].append((rt, service))
                rows["mcp"].append((mcp_rt, result.structured_content["total_time_s"]))
    return rows, answers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=50, help="questions per path")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8, help="frames sent before asking (even)")
    parser.add_argument("--model", help="checkpoint (default: a tiny random model written to a temp dir)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fvs_bench_mcp_"))
    model = args.model or str(tmp / "tiny")
    if not args.model:
        subprocess.run([sys.executable, "-m", "fvs_ros.model.tiny", model], check=True, capture_output=True)
    log = open(tmp / "node.log", "w")
    node_proc = start_node(model, log)
    rclpy.init()
    node = rclpy.create_node("fvs_bench_mcp")
    client = node.create_client(Ask, "/fvs/ask")
    publisher = node.create_publisher(
        Image, "/image_raw", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    )
    try:
        deadline = time.monotonic() + 300
        while not wait_for_answers(node, client, 2.0):
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the node did not come up; its log: {tmp / 'node.log'}")
        while publisher.get_subscription_count() < 1 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)  # frames published before the match are lost
        rng = np.random.default_rng(0)
        for i in range(args.frames):
            msg = Image(height=120, width=160, encoding="rgb8", step=480)
            msg.header.stamp.sec, msg.data = 1000 + i, rng.integers(0, 256, (120, 160, 3), np.uint8).tobytes()
            publisher.publish(msg)
            rclpy.spin_once(node, timeout_sec=0.01)
        while True:  # until the node's answers count every frame sent
            future = client.call_async(Ask.Request(question="?", max_new_tokens=1, timeout_s=30.0))
            rclpy.spin_until_future_complete(node, future, timeout_sec=60)
            if future.result().frames_seen >= args.frames or time.monotonic() > deadline:
                break
        rows, answers = asyncio.run(measure(args, node, client))
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(60)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        log.close()

    print(f"{args.questions} questions per path, max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPUs")
    print("path    round trip p50   node service p50   round trip - service: p50    p90")
    rest = {}
    for path, values in rows.items():
        rest[path] = [rt - service for rt, service in values]
        print(
            f"{path:7s} {statistics.median(rt for rt, _ in values) * 1e3:10.1f} ms "
            f"{statistics.median(s for _, s in values) * 1e3:14.1f} ms "
            f"{statistics.median(rest[path]) * 1e3:22.2f} ms {percentile(rest[path], 0.9) * 1e3:6.2f} ms"
        )
    overhead = statistics.median(rest["mcp"]) - statistics.median(rest["direct"])
    print(f"bridge overhead (MCP minus fvs_ask's call, p50 over the service time): {overhead * 1e3:.2f} ms")
    print(f"distinct answers: {len(answers)} (the same question on an unchanged memory: 1 expected)")


if __name__ == "__main__":
    main()
