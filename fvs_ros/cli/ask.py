"""Ask the fvs node a question from a shell (a stand-in for `ros2 service call`).

    python -m fvs_ros.cli.ask "What is on the table?" [--timeout S] [--max-new-tokens N]
                                 [--service fvs/ask] [--wait S] [--json] [--images DIR]
                                 [--stream [--action fvs/ask_stream]]
    ros2 run fvs_ros fvs_ask "What is on the table?" --ros-args -r __ns:=/robot1   # /robot1/fvs/ask

Prints the answer, its evidence (the moments of the stream it attended to most) and its timings.
--images DIR writes the evidence frames there as JPEG. --stream asks through the ~/ask_stream
action and prints the answer as it is generated; Ctrl-C cancels the goal. Exit status: 0
answered, 1 the node refused, failed or the goal was cancelled (its error is printed), 2 no
service / action server or no response. Names resolve like any ROS name, against this command's
node (`fvs_ask`): a relative one (the defaults) follows `--ros-args -r __ns:=/robot1` and remaps
(`-r fvs/ask:=/cam1/fvs/ask`); an absolute one (`/fvs/ask`) is taken as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import rclpy
from rclpy.action import ActionClient
from rclpy.utilities import remove_ros_args

from fvs_ros.action import Ask as AskAction
from fvs_ros.cli import signals
from fvs_ros.cli.signals import spin_until
from fvs_ros.msg import Evidence
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
        spin_until(node, future, 1.0)
        if future.done():
            return True
        client.remove_pending_request(future)
    return False


def format_response(question: str, r: Ask.Response, answer: bool = True) -> str:
    """The response as text (an Ask response or an Ask action result); answer=False leaves out the
    answer line (already printed while streaming)."""
    if not r.success:
        head = f"Q: {question}\n" if answer else ""
        if r.partial and answer:
            head += f"A (cut short, {r.num_tokens} tokens): {r.answer}\n"
        return f"{head}error: {r.error}\n(total {r.total_time_s:.3f} s)"
    first, last = _stamp(r.first_frame_stamp), _stamp(r.last_frame_stamp)
    span = (
        f"stream {first:.2f}-{last:.2f} s ({last - first:.1f} s) memory_lag={r.memory_lag_s:.2f} s"
        if r.frames_seen
        else "no video yet"
    )
    lines = [f"Q: {question}", f"A: {r.answer}"] if answer else []
    lines.append(f"frames_seen={r.frames_seen} frames_in_memory={r.frames_in_memory} {span}")
    if r.evidence:
        lines.append(f"evidence ({r.memory_attention:.0%} of the attention went to memory):")
        lines += [f"  {format_evidence(e)}" for e in r.evidence]
    lines.append(
        f"time_to_first_token={r.time_to_first_token_s:.3f} s total={r.total_time_s:.3f} s "
        f"tokens={r.num_tokens}"
    )
    return "\n".join(lines)


def format_evidence(e: Evidence) -> str:
    stamp = _stamp(e.stamp)
    if e.kind == Evidence.DETAIL:
        return f"{e.share:6.1%}  detail frame   {stamp:.2f} s (slot {e.slot})"
    first, last = _stamp(e.span_start), _stamp(e.span_end)
    return (
        f"{e.share:6.1%}  context ({e.weight} frames {first:.2f}-{last:.2f} s), "
        f"nearest frame {stamp:.2f} s (slot {e.slot})"
    )


def save_images(r: Ask.Response, directory: Path) -> list[Path]:
    """The evidence images of a response as JPEG files evidence_<rank>_<stamp>.jpg."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, image in enumerate(r.evidence_images):
        if image.data:
            path = directory / f"evidence_{rank}_{_stamp(image.header.stamp):.3f}.jpg"
            path.write_bytes(bytes(image.data))
            paths.append(path)
    return paths


def message_dict(msg) -> dict:
    """A message's fields as plain JSON values, recursively: stamps in seconds, evidence as objects,
    images as their stamp, format and size (data left out), non-finite floats as None (JSON has no
    NaN). Fields added to an interface later come along unchanged."""

    def value(x, kind):
        if kind == "builtin_interfaces/Time":
            return _stamp(x)
        if kind.startswith("sequence<"):
            inner = kind[len("sequence<") : -1]
            return [value(item, inner) for item in x]
        if kind == "sensor_msgs/CompressedImage":
            return {"stamp": _stamp(x.header.stamp), "format": x.format, "bytes": len(x.data)}
        if hasattr(x, "get_fields_and_field_types"):
            return {n: value(getattr(x, n), k) for n, k in x.get_fields_and_field_types().items()}
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    return {name: value(getattr(msg, name), kind) for name, kind in msg.get_fields_and_field_types().items()}


def response_json(response) -> str:
    """The response's fields as one JSON object (message_dict)."""
    return json.dumps(message_dict(response))


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
    parser.add_argument(
        "--camera",
        action="append",
        default=[],
        help="the camera the question is about (the node's cameras parameter; default: its only camera)",
    )
    parser.add_argument(
        "--service", default="fvs/ask", help="Ask service name, relative to the namespace (default: fvs/ask)"
    )
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the service to appear")
    parser.add_argument("--json", action="store_true", help="print the response as one JSON object")
    parser.add_argument("--images", type=Path, help="write the evidence frames to this directory (JPEG)")
    parser.add_argument(
        "--stream", action="store_true", help="ask through the action and print the answer as it comes"
    )
    parser.add_argument(
        "--action", default="fvs/ask_stream", help="Ask action name (with --stream; default: fvs/ask_stream)"
    )
    options = parser.parse_args(remove_ros_args(argv)[1:])

    signals.init(argv)
    node = rclpy.create_node("fvs_ask")
    try:
        if options.stream:
            return _ask_stream(node, options)
        client = node.create_client(Ask, options.service)
        service = node.resolve_service_name(options.service)  # as the client resolved it, for messages
        if not wait_for_answers(node, client, options.wait):
            print(f"service {service} is not available (waited {options.wait:g} s)", file=sys.stderr)
            return EXIT_UNREACHABLE
        future = client.call_async(
            Ask.Request(
                question=options.question,
                timeout_s=options.timeout,
                max_new_tokens=options.max_new_tokens,
                want_images=options.images is not None,
                cameras=options.camera,
            )
        )
        # The node always answers (at the latest when its timeout expires); allow for transport.
        spin_until(node, future, options.timeout + 30 if options.timeout else None)
        if not future.done():
            print(f"no response from {service}", file=sys.stderr)
            return EXIT_UNREACHABLE
        response = future.result()
        _print_response(options, response)
        return EXIT_ANSWERED if response.success else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_UNREACHABLE
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _print_response(options, response, streamed: bool = False) -> None:
    if options.json:
        print(response_json(response))
    else:
        print(format_response(options.question, response, answer=not streamed))
    if options.images is not None:
        for path in save_images(response, options.images):
            print(f"wrote {path}")


def _ask_stream(node, options) -> int:
    """Ask through the action: print each new piece of text as feedback arrives; Ctrl-C cancels."""
    client = ActionClient(node, AskAction, options.action)
    action = node.resolve_topic_name(options.action)  # as the client resolved it, for messages
    if not client.wait_for_server(timeout_sec=options.wait):
        print(f"action {action} is not available (waited {options.wait:g} s)", file=sys.stderr)
        return EXIT_UNREACHABLE
    shown = [0]

    def on_feedback(msg):
        text = msg.feedback.text
        if not options.json:
            print(text[shown[0] :], end="", flush=True)
        shown[0] = len(text)

    goal = AskAction.Goal(
        question=options.question,
        timeout_s=options.timeout,
        max_new_tokens=options.max_new_tokens,
        want_images=options.images is not None,
        cameras=options.camera,
    )
    if not options.json:
        print(f"Q: {options.question}\nA: ", end="", flush=True)
    sent = client.send_goal_async(goal, feedback_callback=on_feedback)
    spin_until(node, sent, 30)
    if not sent.done() or not sent.result().accepted:
        print(f"\nthe goal was not accepted by {action}", file=sys.stderr)
        return EXIT_UNREACHABLE
    handle = sent.result()
    done = handle.get_result_async()
    try:
        spin_until(node, done, options.timeout + 30 if options.timeout else None)
    except KeyboardInterrupt:
        cancelling = handle.cancel_goal_async()
        spin_until(node, cancelling, 5)
        spin_until(node, done, 10)
    if not done.done():
        print(f"\nno result from {action}", file=sys.stderr)
        return EXIT_UNREACHABLE
    result = done.result().result
    if not options.json:
        print(result.answer[shown[0] :])  # whatever feedback did not show, and the line end
    _print_response(options, result, streamed=True)
    return EXIT_ANSWERED if result.success else EXIT_FAILED


def main(args=None):
    """Entry point of `fvs_ask` / `python -m fvs_ros.cli.ask`."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
