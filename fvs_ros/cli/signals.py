"""rclpy for the command-line tools (fvs_ask, fvs_watch): Ctrl-C and SIGTERM end a command alike.

rclpy's own signal handlers shut the context down at SIGINT or SIGTERM: a command could then no
longer cancel its goal, and SIGTERM surfaced as an ExternalShutdownException traceback. Here both
signals raise KeyboardInterrupt in the main thread, with the context still up, and each command
handles that (fvs_ask --stream cancels its goal; fvs_watch events ends with status 0).
"""

from __future__ import annotations

import signal
import time

import rclpy
from rclpy.signals import SignalHandlerOptions

STEP_S = 0.1  # rcl's wait does not return for a signal: spin in steps this short


def init(argv) -> None:
    """rclpy.init(args=argv) without rclpy's signal handlers; SIGINT and SIGTERM raise KeyboardInterrupt."""
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)


def spin_until(node, future, timeout: float | None = None) -> bool:
    """Spin `node` until `future` is done or `timeout` seconds passed (None: no limit); whether it
    is done. A signal is handled within STEP_S."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not future.done():
        left = STEP_S if deadline is None else min(STEP_S, deadline - time.monotonic())
        if left <= 0:
            break
        rclpy.spin_until_future_complete(node, future, timeout_sec=left)
    return future.done()
