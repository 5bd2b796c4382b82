"""One client process of the concurrency tests: wait until the node answers, wait for the start
signal (a file), ask COUNT questions at once, print the replies as one JSON line.

    python test/support/ask_once.py READY_DIR START_FILE QUESTION [--count N] [--timeout S] [--wait S]
                                    [--take-after S]
                                    [--max-new-tokens N]

Writes READY_DIR/<pid> once the service answered a ping (an empty question, refused at once:
see fvs_ros.cli.ask.wait_for_answers), so the test can start every client's questions at the
same moment by creating START_FILE. The client keeps every reply (fvs_ros.ros.qos.CLIENT_QOS);
--take-after makes it a client busy with other work, which takes its replies only that many
seconds after sending (the immediate busy refusals have all arrived by then).
"""

import argparse
import json
import os
import time
from pathlib import Path

import rclpy

from fvs_ros.cli.ask import wait_for_answers
from fvs_ros.ros.qos import CLIENT_QOS
from fvs_ros.srv import Ask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ready_dir")
    parser.add_argument("start_file")
    parser.add_argument("question")
    parser.add_argument("--count", type=int, default=1, help="questions sent at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="timeout_s of each question")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the service")
    parser.add_argument("--take-after", type=float, default=0.0, help="seconds before taking any reply")
    parser.add_argument("--max-new-tokens", type=int, default=2, help="max_new_tokens of each question")
    args = parser.parse_args()
    rclpy.init()
    node = rclpy.create_node(f"ask_once_{os.getpid()}")
    client = node.create_client(Ask, "/fvs/ask", qos_profile=CLIENT_QOS)
    reply = {"pid": os.getpid(), "question": args.question, "replies": []}
    try:
        if not wait_for_answers(node, client, args.wait):
            reply["outcome"] = "service not reachable"
            return
        Path(args.ready_dir, str(os.getpid())).touch()
        while not Path(args.start_file).exists():
            time.sleep(0.01)
        futures = [
            client.call_async(
                Ask.Request(
                    question=f"{args.question} ({i})",
                    max_new_tokens=args.max_new_tokens,
                    timeout_s=args.timeout,
                )
            )
            for i in range(args.count)
        ]
        time.sleep(args.take_after)  # replies arriving meanwhile wait in the client's reply history
        deadline = time.monotonic() + args.timeout + 30.0  # the node answers each within its timeout_s
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        for f in futures:
            if f.done():
                r = f.result()
                reply["replies"].append(
                    {
                        "success": r.success,
                        "error": r.error,
                        "frames_seen": r.frames_seen,
                        "tokens": r.num_tokens,
                    }
                )
        reply["outcome"] = "reply" if len(reply["replies"]) == args.count else "no reply"
    finally:
        print(json.dumps(reply), flush=True)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
