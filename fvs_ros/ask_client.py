"""Ask the fvs node a question from a shell (a stand-in for `ros2 service call`).

    python -m fvs_ros.ask_client "What is on the table?" [--timeout S] [--max-new-tokens N]
                                 [--service /fvs/ask] [--wait S] [--json]
    ros2 run fvs_ros fvs_ask "What is on the table?"

Prints the answer and its timings. Exit status: 0 answered, 1 the node refused or failed
(its error is printed), 2 no service or no response.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.utilities import remove_ros_args

from fvs_ros.srv import Ask

EXIT_ANSWERED, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


def _stamp(t) -> float:
    return t.sec + t.nanosec * 1e-9


def wait_for_answers(node, client, timeout: float) -> bool:
    """Wait until the service answers. Right after discovery Fast DDS can drop a reply (the
    server's reply writer has not matched this client yet), so a request the node refuses at
    once, an empty question, is sent until one comes back; the real question is never lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not client.wait_for_service(timeout_sec=min(1.0, max(deadline - time.monotonic(), 0.0))):
            continue
        future = client.call_async(Ask.Request(question=""))
        rclpy.spin_until_future_complete(node, future, timeout_sec=1.0)
        if future.done():
            return True
        client.remove_pending_request(future)
    return False


def format_response(question: str, r: Ask.Response) -> str:
    if not r.success:
        return f"Q: {question}\nerror: {r.error}\n(total {r.total_time_s:.3f} s)"
    first, last = _stamp(r.first_frame_stamp), _stamp(r.last_frame_stamp)
    span = (
        f"stream {first:.2f}-{last:.2f} s ({last - first:.1f} s) memory_lag={r.memory_lag_s:.2f} s"
        if r.frames_seen
        else "no video yet"
    )
    return (
        f"Q: {question}\nA: {r.answer}\n"
        f"frames_seen={r.frames_seen} frames_in_memory={r.frames_in_memory} {span}\n"
        f"time_to_first_token={r.time_to_first_token_s:.3f} s total={r.total_time_s:.3f} s "
        f"tokens={r.num_tokens}"
    )


def run(args=None) -> int:
    """Ask once; returns the exit status."""
    argv = sys.argv if args is None else args
    parser = argparse.ArgumentParser(prog="fvs_ask", description="Ask the fvs node a question.")
    parser.add_argument("question")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds the node may take to answer (0: the node's default_timeout_s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the node's max_new_tokens")
    parser.add_argument("--service", default="/fvs/ask", help="Ask service name (default: /fvs/ask)")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the service to appear")
    parser.add_argument("--json", action="store_true", help="print the response as one JSON object")
    options = parser.parse_args(remove_ros_args(argv)[1:])

    rclpy.init(args=argv)
    node = rclpy.create_node("fvs_ask")
    try:
        client = node.create_client(Ask, options.service)
        if not wait_for_answers(node, client, options.wait):
            print(f"service {options.service} is not available (waited {options.wait:g} s)", file=sys.stderr)
            return EXIT_UNREACHABLE
        future = client.call_async(
            Ask.Request(
                question=options.question, timeout_s=options.timeout, max_new_tokens=options.max_new_tokens
            )
        )
        # The node always answers (at the latest when its timeout expires); allow for transport.
        rclpy.spin_until_future_complete(
            node, future, timeout_sec=options.timeout + 30 if options.timeout else None
        )
        if not future.done():
            print(f"no response from {options.service}", file=sys.stderr)
            return EXIT_UNREACHABLE
        response = future.result()
        if options.json:
            fields = response.get_fields_and_field_types()
            print(
                json.dumps(
                    {
                        name: (
                            _stamp(getattr(response, name))
                            if kind == "builtin_interfaces/Time"
                            else getattr(response, name)
                        )
                        for name, kind in fields.items()
                    }
                )
            )
        else:
            print(format_response(options.question, response))
        return EXIT_ANSWERED if response.success else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_UNREACHABLE
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def main(args=None):
    """Entry point of `fvs_ask` / `python -m fvs_ros.ask_client`."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
