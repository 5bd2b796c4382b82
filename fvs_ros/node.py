"""The Flash-VStream perception node: a managed (lifecycle) rclpy node around StreamEngine.

configure: load the model, start the engine, create the summary and diagnostics publishers.
activate:  restore memory_file, subscribe to the camera, offer ~/ask, ~/reset, ~/save_memory.
deactivate: stop intake and services, save memory_file.  cleanup: stop the engine.

Callback groups keep the parts apart on a MultiThreadedExecutor: image intake, questions and
housekeeping each have their own, so an answer being generated never stalls image intake.
The node converts between ROS and the engine; it holds no model code.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from fvs_ros import params
from fvs_ros.config import engine_config, memory_config
from fvs_ros.engine import Answer, EngineError, FrameError, QuestionError, open_engine
from fvs_ros.model import ModelLoadError
from fvs_ros.msg import SceneSummary
from fvs_ros.ros_image import MalformedImage, UnsupportedEncoding, compressed_to_rgb, image_to_rgb
from fvs_ros.srv import Ask

SUCCESS, FAILURE, ERROR = (
    TransitionCallbackReturn.SUCCESS,
    TransitionCallbackReturn.FAILURE,
    TransitionCallbackReturn.ERROR,
)
TINY_MODEL_HINT = (
    "set the model parameter to a local checkpoint directory, or write a tiny random "
    "test model with `python -m fvs_ros.model.tiny /tmp/fvs_tiny` and use model:=/tmp/fvs_tiny; "
    "then configure again"
)


def _transition(func):
    """Log unexpected exceptions of a transition callback (rclpy would turn them into a silent ERROR)."""

    @functools.wraps(func)
    def wrapper(self, state):
        try:
            return func(self, state)
        except Exception as e:  # noqa: BLE001
            self.get_logger().error(f"{func.__name__} failed: {type(e).__name__}: {e}")
            return ERROR

    return wrapper


class FvsNode(LifecycleNode):
    """Answers questions about everything its camera has seen, from a fixed-size Flash Memory."""

    def __init__(self, **kwargs):
        super().__init__("fvs", **kwargs)
        params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._state = "unconfigured"
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._ask_group = MutuallyExclusiveCallbackGroup()
        self._misc_group = MutuallyExclusiveCallbackGroup()
        self._engine = None
        self._p: dict = {}
        self._summary_pub = self._diag_pub = self._diag_timer = None
        self._image_sub = None
        self._topic = ""
        self._fvs_services: list = []
        self._frame_id = ""
        self._received = self._unsupported = self._malformed = 0
        self._image_problem = ""  # the latest malformed/unsupported image, for diagnostics
        self._reported_encodings: set = set()
        self._log_handler = _RosLogHandler(self.get_logger())
        logging.getLogger("fvs_ros").addHandler(self._log_handler)

    # ------------------------------------------------------------------ lifecycle

    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = params.read(self)
            memory, config = memory_config(p), engine_config(p)
        except ValueError as e:
            self.get_logger().error(f"configure failed: {e}")
            return FAILURE
        self.get_logger().info(f"loading model '{p['model']}' (device {p['device']}, dtype {p['dtype']})")
        t0 = time.perf_counter()
        try:
            self._engine = open_engine(
                p["model"],
                memory,
                config,
                device=p["device"],
                dtype=p["dtype"],
                on_summary=self._publish_summary,
            )
        except ModelLoadError as e:
            self.get_logger().error(f"cannot load model '{p['model']}': {e} -- {TINY_MODEL_HINT}")
            return FAILURE
        except Exception as e:  # noqa: BLE001 - CUDA OOM, corrupt weights, ...: stay up and unconfigured
            self.get_logger().error(f"loading model '{p['model']}' failed: {type(e).__name__}: {e}")
            return FAILURE
        self._p = p
        self._summary_pub = self.create_lifecycle_publisher(SceneSummary, "~/scene_summary", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            p["diagnostics_period_s"], self._publish_diagnostics, callback_group=self._misc_group
        )
        self.get_logger().info(
            f"model loaded in {time.perf_counter() - t0:.1f} s; memory slots of {config.frames_per_slot} "
            f"frame(s) ({'the trained layout' if config.frames_per_slot == 2 else 'one frame per slot'})"
        )
        self._state = "inactive"
        return SUCCESS

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._p = params.read(self)  # configure-time values cannot have changed since
        self._restore_memory(p["memory_file"])
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=p["qos_depth"],
            reliability=(
                ReliabilityPolicy.RELIABLE
                if p["reliability"] == "reliable"
                else ReliabilityPolicy.BEST_EFFORT
            ),
        )
        if p["image_transport"] == "compressed":
            msg_type, topic, convert = (
                CompressedImage,
                p["image_topic"].rstrip("/") + "/compressed",
                compressed_to_rgb,
            )
        else:
            msg_type, topic, convert = Image, p["image_topic"], image_to_rgb
        self._image_sub = self.create_subscription(
            msg_type, topic, functools.partial(self._on_image, convert), qos, callback_group=self._image_group
        )
        self._fvs_services = [
            self.create_service(Ask, "~/ask", self._on_ask, callback_group=self._ask_group),
            self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._misc_group),
            self.create_service(
                Trigger, "~/save_memory", self._on_save_memory, callback_group=self._misc_group
            ),
        ]
        self._topic = self._image_sub.topic_name
        self.get_logger().info(
            f"watching {self._topic} ({msg_type.__name__}, {p['reliability']}, depth {p['qos_depth']})"
        )
        self._state = "active"
        return super().on_activate(state)

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_intake()
        return super().on_deactivate(state)

    @_transition
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    @_transition
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.finalize()
        self._state = "finalized"
        return SUCCESS

    @_transition
    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.finalize()
        return SUCCESS

    def shutdown(self):
        """The lifecycle shutdown transition from whatever primary state the node is in."""
        if self._state != "finalized":
            self.trigger_shutdown()

    def finalize(self):
        """Stop intake (saving memory_file) and the engine, whatever state the node is in."""
        if self._state == "active":
            self._stop_intake()
        self._release()

    def _stop_intake(self):
        if self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
            self._image_sub = None
        for service in self._fvs_services:
            self.destroy_service(service)
        self._fvs_services = []
        self._state = "inactive"
        if self._p.get("memory_file"):
            self._save_memory(self._p["memory_file"])

    def _release(self):
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self.destroy_publisher(self._diag_pub)
            self.destroy_lifecycle_publisher(self._summary_pub)
            self._summary_pub = self._diag_pub = self._diag_timer = None
        self._state = "unconfigured"

    def _on_set_parameters(self, changes) -> SetParametersResult:
        for change in changes:
            reason = params.check_change(change.name, change.value, self._state)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ images

    def _on_image(self, convert, msg):
        """Convert and hand the frame to the engine; never blocks (the engine's queue drops the oldest)."""
        self._received += 1
        topic = self._topic
        try:
            frame = convert(msg)
        except UnsupportedEncoding as e:
            self._unsupported += 1
            self._image_problem = str(e)
            if (topic, msg.encoding) not in self._reported_encodings:
                self._reported_encodings.add((topic, msg.encoding))
                self.get_logger().error(f"{topic}: {e}; frames in this encoding are ignored")
            return
        except MalformedImage as e:
            self._malformed += 1
            self._image_problem = str(e)
            self.get_logger().warning(
                f"{topic}: malformed image dropped ({self._malformed} so far): {e}", throttle_duration_sec=5.0
            )
            return
        self._frame_id = msg.header.frame_id
        stamp = _seconds(msg.header.stamp) or self.get_clock().now().nanoseconds * 1e-9
        try:
            self._engine.add_frame(frame, stamp)
        except FrameError as e:
            self.get_logger().warning(f"{topic}: frame rejected: {e}", throttle_duration_sec=5.0)
        except EngineError:  # shutting down: the engine stopped under this callback
            pass

    # ------------------------------------------------------------------ services

    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        t0 = time.perf_counter()
        try:
            _check_request(request, self._p["max_question_chars"])
            limit = self._p["max_new_tokens"]
            answer = self._engine.ask(
                request.question, min(request.max_new_tokens or limit, limit), request.timeout_s or None
            )
        except QuestionError as e:  # the caller's mistake, returned to the caller
            response.success, response.error = False, str(e)
            self.get_logger().debug(f"ask {_preview(request.question)} refused: {e}")
        except EngineError as e:
            response.success, response.error = False, str(e)
            self.get_logger().warning(f"ask {_preview(request.question)} failed: {e}")
        except Exception as e:  # noqa: BLE001 - a service callback must answer, not raise
            response.success, response.error = False, f"internal error: {type(e).__name__}: {e}"
            self.get_logger().error(f"ask {_preview(request.question)}: {response.error}")
        else:
            _fill_answer(response, answer)
            self.get_logger().info(
                f"ask {_preview(request.question)} -> {_preview(answer.text)} "
                f"({answer.frames_seen} frames, ttft {answer.ttft_s:.3f} s, "
                f"total {answer.total_s:.3f} s)"
            )
        response.total_time_s = time.perf_counter() - t0
        return response

    def _on_reset(self, request, response: Trigger.Response) -> Trigger.Response:
        forgotten = self._engine.stats().frames_seen
        self._engine.reset()
        self._received = self._unsupported = self._malformed = 0
        self._image_problem = ""
        response.success, response.message = True, f"memory cleared ({forgotten} frames forgotten)"
        self.get_logger().info(response.message)
        return response

    def _on_save_memory(self, request, response: Trigger.Response) -> Trigger.Response:
        path = self._p["memory_file"]
        if not path:
            response.success, response.message = False, "memory_file parameter is empty: nowhere to save"
        else:
            response.success = self._save_memory(path)
            response.message = f"memory saved to {path}" if response.success else f"saving to {path} failed"
        return response

    def _save_memory(self, path: str) -> bool:
        try:
            self._engine.flush(timeout=5.0)
            self._engine.save(Path(path).expanduser())
        except Exception as e:  # noqa: BLE001 - shutting down must go on
            self.get_logger().error(f"saving memory to {path} failed: {type(e).__name__}: {e}")
            return False
        self.get_logger().info(f"memory saved to {path} ({self._engine.stats().frames_seen} frames seen)")
        return True

    def _restore_memory(self, path: str):
        if not path or not Path(path).expanduser().exists():
            return
        try:
            self._engine.load(Path(path).expanduser())
        except Exception as e:  # noqa: BLE001 - an unreadable file must not keep the camera off
            self.get_logger().error(
                f"cannot restore memory from {path}, starting empty: {type(e).__name__}: {e}"
            )
            return
        self.get_logger().info(
            f"memory restored from {path} ({self._engine.stats().frames_seen} frames seen)"
        )

    # ------------------------------------------------------------------ outputs

    def _publish_summary(self, answer: Answer):
        """Engine callback (LLM worker thread) with a finished periodic summary (so the node is
        configured)."""
        msg = SceneSummary(
            summary=answer.text,
            frames_seen=answer.frames_seen,
            frames_dropped=self._engine.stats().frames_dropped,
            first_frame_stamp=_time_msg(answer.first_stamp),
            last_frame_stamp=_time_msg(answer.last_stamp),
            memory_lag_s=_lag(answer),
            generation_time_s=answer.total_s,
        )
        msg.header.stamp, msg.header.frame_id = msg.last_frame_stamp, self._frame_id
        self._summary_pub.publish(msg)

    def _publish_diagnostics(self):
        engine = self._engine
        if engine is None:
            return
        s = engine.stats()
        slots = len(engine.snapshot().csm_weights)
        status = DiagnosticStatus(
            name=f"{self.get_name()}: Flash-VStream memory", hardware_id=self._p["model"]
        )
        if not s.running:
            status.level, status.message = DiagnosticStatus.ERROR, "engine stopped"
        elif s.last_error or self._malformed or self._unsupported:
            status.level = DiagnosticStatus.WARN
            status.message = s.last_error or f"bad images received, latest: {self._image_problem}"
        else:
            status.level, status.message = DiagnosticStatus.OK, self._state
        device_mem = s.device_memory_bytes
        values = {
            "state": self._state,
            "frames_received": self._received,
            "frames_unsupported": self._unsupported,
            "frames_malformed": self._malformed,
            "last_image_problem": self._image_problem,
            "frames_rejected": s.frames_rejected,
            "frames_skipped_by_sampling": s.frames_skipped,
            "frames_dropped": s.frames_dropped,
            "frames_into_memory": s.frames_into_memory,
            "frames_seen": s.frames_seen,
            "frames_per_slot": self._engine.config.frames_per_slot,
            "queue_depth": s.queue_depth,
            "memory_slots_used": f"{slots}/{self._p['csm_slots']}",
            "memory_fill": f"{slots / self._p['csm_slots']:.2f}",
            "last_update_s": _fmt(s.last_update_s),
            "last_answer_latency_s": _fmt(s.last_answer_s),
            "last_time_to_first_token_s": _fmt(s.last_ttft_s),
            "questions_answered": s.questions_answered,
            "questions_failed": s.questions_failed,
            "questions_timed_out": s.questions_timed_out,
            "summaries": s.summaries,
            "errors": s.errors,
            "device_memory_mib": "n/a" if device_mem is None else f"{device_mem / 2**20:.0f}",
            "process_rss_mib": f"{_rss_bytes() / 2**20:.0f}",
        }
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        self._diag_pub.publish(
            DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status])
        )

    def destroy_node(self):
        logging.getLogger("fvs_ros").removeHandler(self._log_handler)
        super().destroy_node()


class _RosLogHandler(logging.Handler):
    """Forwards the engine's Python logging (warnings and errors) to the node's ROS logger."""

    def __init__(self, logger):
        super().__init__(logging.WARNING)
        self.ros_logger = logger

    def emit(self, record):
        level = self.ros_logger.error if record.levelno >= logging.ERROR else self.ros_logger.warning
        level(f"{record.name}: {record.getMessage()}")


def _check_request(request: Ask.Request, max_chars: int):
    if not request.question.strip():
        raise QuestionError("question is empty")
    if len(request.question) > max_chars:
        raise QuestionError(
            f"question has {len(request.question)} characters; max_question_chars is {max_chars}"
        )
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        raise QuestionError(f"timeout_s must be >= 0 seconds (0: default_timeout_s), got {request.timeout_s}")


def _fill_answer(response: Ask.Response, answer: Answer):
    response.success, response.answer = True, answer.text
    response.frames_seen, response.frames_in_memory = answer.frames_seen, answer.frames_in_memory
    response.first_frame_stamp = _time_msg(answer.first_stamp)
    response.last_frame_stamp = _time_msg(answer.last_stamp)
    response.memory_lag_s = _lag(answer)
    response.time_to_first_token_s = answer.ttft_s
    response.num_tokens = answer.num_tokens


def _lag(answer: Answer) -> float:
    """Answer.memory_lag_s for the interface: -1 when the memory was empty."""
    return -1.0 if answer.memory_lag_s is None else answer.memory_lag_s


def _seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _time_msg(seconds: Optional[float]) -> Time:
    if not seconds:
        return Time()
    sec = math.floor(seconds)
    return Time(sec=sec, nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _preview(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + f"... ({len(text)} chars)")


def main(args=None):
    """Entry point of `fvs_node` / `python -m fvs_ros.node [--autostart] [--ros-args ...]`."""
    argv = sys.argv if args is None else args
    parser = argparse.ArgumentParser(prog="fvs_node", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--autostart",
        action="store_true",
        help="configure and activate at start (without launch; launch activates it itself)",
    )
    options = parser.parse_args(rclpy.utilities.remove_ros_args(argv)[1:])
    # Our own SIGINT/SIGTERM handling: rclpy's handler sometimes fails to wake a waiting executor
    # (seen with the Kilted wheels), and the node must save its memory and stop the engine while
    # the context is still valid.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node = FvsNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        if options.autostart and node.trigger_configure() == SUCCESS:
            node.trigger_activate()
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.2)
        node.shutdown()
    finally:
        node.finalize()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
