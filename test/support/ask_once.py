"""One client process of the concurrency test: wait until the node answers, wait for the start
signal (a file), ask one question, print the reply as one JSON line.

    python test/support/ask_once.py READY_DIR START_FILE QUESTION [--timeout S] [--max-new-tokens N]

Writes READY_DIR/<pid> once the service answered a ping (an empty question, refused at once:
see fvs_ros.cli.ask.wait_for_answers), so the test can start every client's question at the
same moment by creating START_FILE.
"""

import argparse
import json
import os
import time
from pathlib import Path

import rclpy

from fvs_ros.cli.ask import wait_for_answers
from fvs_ros.srv import Ask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ready_dir")
    parser.add_argument("start_file")
    parser.add_argument("question")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    args = parser.parse_args()
    rclpy.init()
    node = rclpy.create_node(f"ask_once_{os.getpid()}")
    client = node.create_client(Ask, "/fvs/ask")
    reply = {"pid": os.getpid(), "question": args.question}
    try:
        if not wait_for_answers(node, client, 300.0):
            reply["outcome"] = "service not reachable"
            return
        Path(args.ready_dir, str(os.getpid())).touch()
        while not Path(args.start_file).exists():
            time.sleep(0.01)
        future = client.call_async(
            Ask.Request(question=args.question, max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
        )
        rclpy.spin_until_future_complete(node, future, timeout_sec=args.timeout + 30.0)
        if not future.done():
            reply["outcome"] = "no reply"
            return
        r = future.result()
        reply.update(
            outcome="reply", success=r.success, error=r.error, frames_seen=r.frames_seen, tokens=r.num_tokens
        )
    finally:
        print(json.dumps(reply), flush=True)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
