"""Standing queries from a shell (a stand-in for `ros2 service call` / `ros2 topic echo`).

    python -m fvs_ros.cli.watch add "a person is at the door" [--threshold 0.6] [--name door]
    python -m fvs_ros.cli.watch remove door
    python -m fvs_ros.cli.watch list
    python -m fvs_ros.cli.watch events [--count N] [--duration S]  # ~/events with their evidence
    ros2 run fvs_ros fvs_watch list

Common options: --node fvs (the node's name; relative, so it follows `--ros-args -r __ns:=/robot1`
to /robot1/fvs, and remaps apply to <node>/watch and <node>/events), --wait S (for the service), --json.
Exit status: 0 done, 1 the node refused (its error is printed), 2 no service or no response.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args

from fvs_ros.cli import signals
from fvs_ros.cli.signals import spin_until
from fvs_ros.msg import WatchEvent
from fvs_ros.srv import Watch

EXIT_DONE, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2


def wait_for_service(node, client, timeout: float) -> bool:
    """Until the service replies: right after discovery Fast DDS can drop a reply, so an idempotent
    `list` is sent until one comes back (see ask_client.wait_for_answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not client.wait_for_service(timeout_sec=min(1.0, max(deadline - time.monotonic(), 0.0))):
            continue
        future = client.call_async(Watch.Request(command=Watch.Request.LIST))
        spin_until(node, future, 1.0)
        if future.done():
            return True
        client.remove_pending_request(future)
    return False


def format_conditions(r: Watch.Response) -> str:
    if not r.names:
        return "no conditions watched"
    rows = []
    cameras = list(r.condition_cameras) or [""] * len(r.names)  # one camera: unnamed
    for name, text, threshold, active, p, camera in zip(
        r.names, r.conditions, r.thresholds, r.active, r.probabilities, cameras, strict=True
    ):
        state = "TRUE " if active else "false"
        prob = "  n/a" if math.isnan(p) else f"{p:.3f}"
        label = text if name == text else f"{name}: {text}"
        where = f"[{camera}] " if camera else ""
        rows.append(f"{state} P(yes)={prob} threshold={threshold:.3f}  {where}{label}")
    return "\n".join(rows)


def format_event(e: WatchEvent) -> str:
    what = "became TRUE " if e.rising else "is false again"
    evidence = ", ".join(f"{_seconds(item.stamp):.3f} ({100 * item.share:.0f}%)" for item in e.evidence)
    return (
        f"[{_seconds(e.header.stamp):.3f}] {e.camera + ': ' if e.camera else ''}{e.name!r} {what} "
        f"P(yes)={e.probability:.3f} "
        f"threshold={e.threshold:.3f} frames_seen={e.frames_seen} latency={e.latency_s:.3f} s"
        + (f" evidence at {evidence}" if evidence else "")
    )


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def response_dict(r: Watch.Response) -> dict:
    """A Watch response as one object per condition (probability None before its first evaluation)."""
    return {
        "success": r.success,
        "error": r.error,
        "conditions": [
            {
                "name": n,
                "condition": c,
                "threshold": t,
                "active": a,
                "probability": None if math.isnan(p) else p,
            }
            for n, c, t, a, p in zip(
                r.names, r.conditions, r.thresholds, r.active, r.probabilities, strict=True
            )
        ],
    }


def _event_json(e: WatchEvent) -> str:
    return json.dumps(
        {
            "stamp": _seconds(e.header.stamp),
            "name": e.name,
            "condition": e.condition,
            "threshold": e.threshold,
            "probability": e.probability,
            "rising": e.rising,
            "frames_seen": e.frames_seen,
            "latency_s": e.latency_s,
            "evidence": [
                {
                    "kind": "detail" if item.kind == item.DETAIL else "context",
                    "stamp": _seconds(item.stamp),
                    "share": item.share,
                    "span": [_seconds(item.span_start), _seconds(item.span_end)],
                    "weight": item.weight,
                    "slot": item.slot,
                }
                for item in e.evidence
            ],
        }
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvs_watch", description="Standing queries on the fvs node.")
    parser.add_argument(
        "--node",
        default="fvs",
        help="the node's name, relative to the namespace unless it starts with / (default: fvs)",
    )
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the node")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    parser.add_argument(
        "--camera",
        action="append",
        default=[],
        help="add/remove/list on this camera only (repeatable; default: every camera)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="watch a condition")
    add.add_argument("condition", help="e.g. 'a person is at the door'")
    add.add_argument("--threshold", type=float, default=0.5, help="rises at P(yes) >= this (default 0.5)")
    add.add_argument("--name", default="", help="name (default: the condition text)")
    remove = sub.add_parser("remove", help="stop watching a condition")
    remove.add_argument("name")
    sub.add_parser("list", help="the watched conditions, their latest P(yes) and state")
    events = sub.add_parser("events", help="print events from <node>/events as they arrive")
    events.add_argument("--count", type=int, default=0, help="stop after this many (0: run until Ctrl-C)")
    events.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: no limit)"
    )
    return parser


def run(args=None) -> int:
    argv = sys.argv if args is None else args
    options = build_parser().parse_args(remove_ros_args(argv)[1:])
    signals.init(argv)
    node = rclpy.create_node("fvs_watch")
    try:
        if options.command == "events":
            return _echo_events(node, options)
        client = node.create_client(Watch, f"{options.node.rstrip('/')}/watch")
        service = node.resolve_service_name(client.srv_name)  # as the client resolved it, for messages
        if not wait_for_service(node, client, options.wait):
            print(f"service {service} is not available (waited {options.wait:g} s)", file=sys.stderr)
            return EXIT_UNREACHABLE
        request = Watch.Request(command=options.command, cameras=options.camera)
        if options.command == "add":
            request.condition, request.threshold, request.name = (
                options.condition,
                options.threshold,
                options.name,
            )
        elif options.command == "remove":
            request.name = options.name
        future = client.call_async(request)
        spin_until(node, future, 30.0)
        if not future.done():
            print(f"no response from {service}", file=sys.stderr)
            return EXIT_UNREACHABLE
        response = future.result()
        if options.json:
            print(json.dumps(response_dict(response)))
        else:
            if not response.success:
                print(f"refused: {response.error}", file=sys.stderr)
            print(format_conditions(response))
        return EXIT_DONE if response.success else EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_DONE
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _echo_events(node, options) -> int:
    received = []

    def on_event(e: WatchEvent):
        received.append(e)
        print(_event_json(e) if options.json else format_event(e), flush=True)

    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(WatchEvent, f"{options.node.rstrip('/')}/events", on_event, qos)
    end = time.monotonic() + options.duration if options.duration > 0 else math.inf
    while time.monotonic() < end and not (options.count and len(received) >= options.count):
        rclpy.spin_once(node, timeout_sec=min(0.2, max(end - time.monotonic(), 0.0)))
    return EXIT_DONE


def main(args=None):
    """Entry point of `fvs_watch` / `python -m fvs_ros.cli.watch`."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
