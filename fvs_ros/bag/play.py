"""Play a bag's image topic at recorded timing: a stand-in for `ros2 bag play` where rosbag2 is missing.

    python -m fvs_ros.bag.play BAG [--topic T] [--rate 1] [--clock [HZ]] [--remap NEW_TOPIC]

Publishes the recorded (serialized) messages unchanged, and with --clock a rosgraph_msgs/Clock
on /clock carrying the bag's time (like `ros2 bag play --clock`, default 40 Hz). Only the image
topic is played. Pair it with `python -m fvs_ros.bag.evaluate ... --mode live --player external`.
"""

from __future__ import annotations

import argparse
import sys

from fvs_ros.bag.bagio import BagError, ImageBag


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fvs_ros.bag.play",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("bag", metavar="BAG")
    p.add_argument("--topic", help="image topic in the bag (default: its only image topic)")
    p.add_argument("--remap", help="publish on this topic instead")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--clock", nargs="?", type=float, const=40.0, default=0.0, metavar="HZ")
    p.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="wait up to this long for --subscribers matched subscriptions before playing (DDS discovery "
        "of a new process can take ~3 s; frames published before that are lost)",
    )
    p.add_argument("--subscribers", type=int, default=1, help="subscriptions to wait for (default 1)")
    p.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds to sleep before playing (like ros2 bag play --delay)",
    )
    args = p.parse_args(argv)
    if args.rate <= 0:
        print("play: error: --rate must be > 0", file=sys.stderr)
        return 2
    from fvs_ros.bag.live import play

    try:
        with ImageBag(args.bag, args.topic) as bag:
            res = play(
                bag,
                topic=args.remap,
                rate=args.rate,
                clock_hz=args.clock,
                reliability=args.reliability,
                wait_s=args.wait,
                subscribers=args.subscribers,
                delay_s=args.delay,
            )
    except BagError as e:
        print(f"play: error: {e}", file=sys.stderr)
        return 2
    late = res["frames_late_s"]
    print(
        f"played {res['published']} frames on {res['topic']}; late p50 {1000 * (late['p50'] or 0):.1f} ms, "
        f"max {1000 * (late['max'] or 0):.1f} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
