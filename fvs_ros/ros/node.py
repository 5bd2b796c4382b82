"""The Flash-VStream perception node: a managed (lifecycle) rclpy node around StreamEngine.

configure: load the model once, start one stream per camera on it (fvs_ros.engine.host; one camera
           without the cameras parameter), offer ~/ask, ~/ask_stream (action), ~/reset,
           ~/save_memory, publish ~/scene_summary, ~/memory_view and /diagnostics.
activate:  restore memory_file per camera (the watched conditions already at configure, merged
           with those added since), subscribe to each camera, save every save_period_s.
deactivate: stop intake, save memory_file (questions are refused while inactive).
cleanup: stop the engine (pending questions fail), withdraw the services.
shutdown: all of the above from any state; then the process ends.

Callback groups keep the parts apart on a MultiThreadedExecutor: image intake, questions (many at
once, up to max_pending_questions) and housekeeping each have their own, so an answer being
generated never stalls image intake. Every callback handles its own failure: it is counted in
/diagnostics and logged, and services answer success: false with the reason. The node converts
between ROS and the engine; it holds no model code.
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
from typing import Optional

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from fvs_ros.engine import Answer, AnswerCancelled, AnswerTimeout, EngineError, QuestionError, open_host
from fvs_ros.engine.grounding import DETAIL, EvidenceItem
from fvs_ros.engine.persistence import ForeignPath
from fvs_ros.engine.settings import engine_config, memory_config, watch_config
from fvs_ros.engine.stream_engine import budget_check
from fvs_ros.engine.thumbnails import encode_jpeg
from fvs_ros.engine.watch import Watcher, WatchError, WatchResult
from fvs_ros.model import BudgetExceeded, ModelLoadError, resolve_device_dtype
from fvs_ros.msg import Evidence, SceneSummary, WatchEvaluation, WatchEvent
from fvs_ros.ros import diagnostics, params
from fvs_ros.ros.ask_action import MAX_GOALS, AskStreamServer
from fvs_ros.ros.camera import Camera, camera_memory_dir
from fvs_ros.ros.memory_file import check_memory_file
from fvs_ros.ros.qos import SERVICE_QOS
from fvs_ros.srv import Ask, Watch

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
# Executor threads: every admitted question blocks one while it waits for the engine; the rest
# serve images, housekeeping, lifecycle and immediate refusals ("busy") of further questions.
EXECUTOR_THREADS = params.SPECS["max_pending_questions"].range[1] + 4 + MAX_GOALS  # + ~/ask_stream goals


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


def _guarded(func):
    """A timer or service callback that counts and logs its own failure instead of raising it into
    the executor (which would end the process). A service gets success: false and the reason."""

    @functools.wraps(func)
    def wrapper(self, *args):
        try:
            return func(self, *args)
        except Exception as e:  # noqa: BLE001
            self._callback_errors += 1
            reason = f"internal error in {func.__name__}: {type(e).__name__}: {e}"
            self._callback_problem = reason
            self.get_logger().error(reason, throttle_duration_sec=5.0)
            if len(args) == 2:  # a service: (request, response)
                response = args[1]
                response.success = False
                if hasattr(response, "error"):
                    response.error = reason
                else:
                    response.message = reason
                return response
            return None

    return wrapper


class FvsNode(LifecycleNode):
    """Answers questions about everything its cameras have seen, from a fixed-size Flash Memory each."""

    def __init__(self, **kwargs):
        super().__init__("fvs", **kwargs)
        params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._state = "unconfigured"
        self.finished = threading.Event()  # set by the shutdown transition: main() then ends the process
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._ask_group = ReentrantCallbackGroup()
        self._misc_group = MutuallyExclusiveCallbackGroup()
        self._host = None  # the EngineHost: the model, shared by the cameras' streams
        self._cameras: dict[str, Camera] = {}  # by name ('' = the single camera without `cameras`)
        self._p: dict = {}
        self._summary_pub = self._diag_pub = self._diag_timer = self._save_timer = None
        self._events_pub = self._scores_pub = None
        self._view_timer = None
        self._view_pubs: list = []  # the cameras' ~/memory_view publishers
        self._ask_stream: AskStreamServer | None = None
        self._fvs_services: list = []
        self._asking = 0  # questions admitted and not answered yet
        self._ask_cv = threading.Condition()
        self._busy_refusals = self._callback_errors = 0
        self._callback_problem = ""
        # Housekeeping timers run on the steady clock: with use_sim_time and no /clock the node
        # clock stands still, and /diagnostics and the periodic save must not stop with it.
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._log_handler = _RosLogHandler(self.get_logger())
        logging.getLogger("fvs_ros").addHandler(self._log_handler)

    # ------------------------------------------------------------------ lifecycle

    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = params.read(self)
            params.check_together(p)
            cameras = params.cameras(self, p)
            for cam in cameras:  # applied at activate; refused early, and again there
                check_memory_file(camera_memory_dir(p["memory_file"], cam.name))
            memory, config = memory_config(p), engine_config(p)
            watch_config(p)  # checked here; each camera gets its own Watcher below
        except ValueError as e:
            self.get_logger().error(f"configure failed: {e}")
            return FAILURE
        try:
            resolve_device_dtype(p["device"])
        except ModelLoadError as e:  # before loading, and not a model problem: say which parameter
            self.get_logger().error(
                f"configure failed: parameter device: {e}; set device to auto or one of those, "
                "then configure again"
            )
            return FAILURE
        self.get_logger().info(
            f"loading model '{p['model']}' (device {p['device']}, dtype {p['dtype']}, weights {p['weights']})"
        )
        t0 = time.perf_counter()
        try:
            self._host = open_host(
                p["model"],
                device=p["device"],
                dtype=p["dtype"],
                weights=p["weights"],
                budget=budget_check(config, memory, p["max_gpu_memory"], self.get_logger().info),
            )
            for settings in cameras:
                self._open_camera(settings, memory, config, watch_config(p))
        except BudgetExceeded as e:  # the model is fine; these settings need more memory than allowed
            self.get_logger().error(f"configure failed: {e}")
            return FAILURE
        except ModelLoadError as e:
            self.get_logger().error(f"cannot load model '{p['model']}': {e} -- {TINY_MODEL_HINT}")
            return FAILURE
        except ValueError as e:  # the parameters do not fit the model (e.g. the prompt its context)
            self.get_logger().error(f"configure failed: {e}")
            self._close_cameras()
            return FAILURE
        except Exception as e:  # noqa: BLE001 - CUDA OOM, corrupt weights, ...: stay up and unconfigured
            self.get_logger().error(f"loading model '{p['model']}' failed: {type(e).__name__}: {e}")
            self._close_cameras()
            return FAILURE
        self._p = p
        for cam in self._cameras.values():  # ~/watch lists and keeps them before activate
            cam.restore_conditions(cam.memory_dir(p["memory_file"]), self.get_logger())
        self._summary_pub = self.create_lifecycle_publisher(SceneSummary, "~/scene_summary", 10)
        events_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE
        )
        self._events_pub = self.create_lifecycle_publisher(WatchEvent, "~/events", events_qos)
        self._scores_pub = self.create_lifecycle_publisher(WatchEvaluation, "~/watch_scores", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            p["diagnostics_period_s"],
            self._publish_diagnostics,
            callback_group=self._misc_group,
            clock=self._steady,
        )
        self._fvs_services = [
            self.create_service(
                Ask, "~/ask", self._on_ask, qos_profile=SERVICE_QOS, callback_group=self._ask_group
            ),
            self.create_service(
                Trigger, "~/reset", self._on_reset, qos_profile=SERVICE_QOS, callback_group=self._misc_group
            ),
            self.create_service(
                Trigger,
                "~/save_memory",
                self._on_save_memory,
                qos_profile=SERVICE_QOS,
                callback_group=self._misc_group,
            ),
            self.create_service(
                Watch, "~/watch", self._on_watch, qos_profile=SERVICE_QOS, callback_group=self._misc_group
            ),
        ]
        self._ask_stream = AskStreamServer(self, "~/ask_stream", self._answer)
        if p["memory_view_period_s"] > 0:  # latched: a viewer started later gets the latest view
            view_qos = QoSProfile(
                history=HistoryPolicy.KEEP_LAST,
                depth=1,
                reliability=ReliabilityPolicy.RELIABLE,
                durability=DurabilityPolicy.TRANSIENT_LOCAL,
            )
            for cam in self._cameras.values():
                topic = f"~/{cam.name}/memory_view" if cam.name else "~/memory_view"
                cam.view_pub = self.create_lifecycle_publisher(Image, topic, view_qos)
                self._view_pubs.append(cam.view_pub)
            self._view_timer = self.create_timer(
                max(1.0, p["memory_view_period_s"]),
                self._publish_memory_view,
                callback_group=self._misc_group,
                clock=self._steady,
            )
        names = ", ".join(self._cameras) if len(cameras) > 1 or cameras[0].name else ""
        self.get_logger().info(
            f"model loaded in {time.perf_counter() - t0:.1f} s; memory slots of {config.frames_per_slot} "
            f"frame(s) ({'the trained layout' if config.frames_per_slot == 2 else 'one frame per slot'})"
            + (f"; cameras: {names}" if names else "")
        )
        self._state = "inactive"
        return SUCCESS

    def _open_camera(self, settings: params.CameraSettings, memory, config, watcher: Watcher):
        """Start one camera's stream on the host's model (the model's warm-up runs once)."""
        cam = Camera(settings, watcher)
        cam.engine = self._host.open_stream(
            settings.name,
            memory,
            config,
            on_summary=lambda answer: self._publish_summary(cam, answer),
            watcher=watcher,
            on_watch=lambda result: self._publish_watch(cam, result),
        )
        self._cameras[settings.name] = cam
        cam.engine.start()

    def _close_cameras(self):
        """Stop every camera's stream (questions still waiting fail) and forget the cameras."""
        for cam in self._cameras.values():
            cam.engine.shutdown()
        self._cameras, self._host = {}, None

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._p = params.read(self)  # configure-time values cannot have changed since
        try:  # a camera's topic settings apply at activate
            settings = {c.name: c for c in params.cameras(self, p)}
        except ValueError as e:
            self.get_logger().error(f"activate failed: {e}")
            return FAILURE
        for cam in self._cameras.values():
            cam.settings = settings[cam.name]
            try:
                self.get_logger().info(cam.activate(self, p, self._image_group))
            except ForeignPath as e:
                self.get_logger().error(f"activate failed: {e}")
                for active in self._cameras.values():
                    active.deactivate(self)
                return FAILURE
        if p["memory_file"] and p["save_period_s"] > 0:
            self._save_timer = self.create_timer(
                p["save_period_s"], self._periodic_save, callback_group=self._misc_group, clock=self._steady
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
        self.finished.set()
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
        if self._save_timer is not None:
            self.destroy_timer(self._save_timer)
            self._save_timer = None
        self._state = "inactive"
        for cam in self._cameras.values():
            cam.deactivate(self)

    def _release(self):
        if self._cameras:
            for cam in self._cameras.values():
                cam.engine.shutdown()  # questions still waiting fail now ...
            with self._ask_cv:  # ... and their callbacks return before the service goes
                self._ask_cv.wait_for(lambda: self._asking == 0, timeout=10.0)
            self._close_cameras()
        if self._ask_stream is not None:  # configure creates it again: one server per configured node
            self._ask_stream.destroy()
            self._ask_stream = None
        for service in self._fvs_services:
            self.destroy_service(service)
        self._fvs_services = []
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self.destroy_publisher(self._diag_pub)
            self.destroy_lifecycle_publisher(self._summary_pub)
            self.destroy_lifecycle_publisher(self._events_pub)
            self.destroy_lifecycle_publisher(self._scores_pub)
            self._summary_pub = self._diag_pub = self._diag_timer = None
        if self._view_timer is not None:
            self.destroy_timer(self._view_timer)
            self._view_timer = None
        for pub in self._view_pubs:
            self.destroy_lifecycle_publisher(pub)
        self._view_pubs = []
        self._busy_refusals = self._callback_errors = 0
        self._callback_problem = ""
        self._events_pub = self._scores_pub = None
        self._state = "unconfigured"

    def _on_set_parameters(self, changes) -> SetParametersResult:
        for change in changes:
            reason = params.check_change(change.name, change.value, self._state)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ services

    @_guarded
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        self._answer(request, response)
        return response

    def _answer(self, request, response, on_token=None, cancel=None) -> bool:
        """Answer `request` (an Ask request or action goal) into `response` (an Ask response or
        action result: the same fields); never raises. True if the request was cancelled."""
        t0 = time.perf_counter()
        admitted = cancelled = False
        try:
            _check_request(request, self._p["max_question_chars"])
            if self._state != "active":
                raise EngineError(f"the node is {self._state}: questions are answered while it is active")
            cams = self._cameras_of(request.cameras)
            admitted = self._admit_question()
            limit = self._p["max_new_tokens"]
            args = (request.question, min(request.max_new_tokens or limit, limit), request.timeout_s or None)
            if len(cams) == 1:  # from that camera's memory alone, the trained one-video prompt
                answer = cams[0].engine.ask(*args, on_token=on_token, cancel=cancel)
            else:  # one prompt, one video block per camera (fvs_ros.engine.several)
                answer = self._host.ask_several(
                    [cam.engine for cam in cams],
                    args[0],
                    max_new_tokens=args[1],
                    timeout=args[2],
                    on_token=on_token,
                    cancel=cancel,
                )
        except AnswerCancelled as e:
            if e.partial is not None:  # what was generated, from which memory
                _fill_answer(response, e.partial, cams[0], False)
            response.success, response.error, cancelled = False, str(e), True
            self.get_logger().info(f"ask {_preview(request.question)} cancelled")
        except AnswerTimeout as e:  # what was generated goes back, marked as cut short
            response.success, response.error = False, str(e)
            response.answer, response.num_tokens, response.partial = e.partial, e.pieces, bool(e.partial)
            self.get_logger().warning(
                f"ask {_preview(request.question)} timed out: {e}", throttle_duration_sec=1.0
            )
        except QuestionError as e:  # the caller's mistake, returned to the caller
            response.success, response.error = False, str(e)
            self.get_logger().debug(f"ask {_preview(request.question)} refused: {e}")
        except EngineError as e:
            response.success, response.error = False, str(e)
            self.get_logger().warning(
                f"ask {_preview(request.question)} failed: {e}", throttle_duration_sec=1.0
            )
        else:
            _fill_answer(response, answer, cams[0], request.want_images)
            self.get_logger().info(
                f"ask {_preview(request.question)} -> {_preview(answer.text)} "
                f"({answer.frames_seen} frames, ttft {answer.ttft_s:.3f} s, "
                f"total {answer.total_s:.3f} s)"
            )
        finally:
            if admitted:
                with self._ask_cv:
                    self._asking -= 1
                    self._ask_cv.notify_all()
        response.total_time_s = time.perf_counter() - t0
        return cancelled

    def _cameras_of(self, names, error=QuestionError) -> list[Camera]:
        """The cameras a request names (each once, in order), else all of them; `error` (QuestionError
        or WatchError: the reply's error) for an unknown name."""
        unknown = [n for n in names if n not in self._cameras]
        if unknown:
            raise error(f"unknown camera {unknown[0]!r}; this node's cameras: {self._camera_list()}")
        return [self._cameras[n] for n in (dict.fromkeys(names) or self._cameras)]

    def _camera_list(self) -> str:
        return (
            ", ".join(repr(n) for n in self._cameras)
            if any(self._cameras)
            else "none named (no cameras parameter)"
        )

    def _admit_question(self) -> bool:
        """Count one more waiting question, or refuse it as busy (EngineError) at the limit."""
        limit = self._p["max_pending_questions"]
        with self._ask_cv:
            if self._asking >= limit:
                self._busy_refusals += 1
                raise EngineError(
                    f"busy: {self._asking} questions are already waiting (max_pending_questions "
                    f"is {limit}); ask again later"
                )
            self._asking += 1
        return True

    @_guarded
    def _on_reset(self, request, response: Trigger.Response) -> Trigger.Response:
        forgotten = sum(cam.reset() for cam in self._cameras.values())
        response.success, response.message = True, f"memory cleared ({forgotten} frames forgotten)"
        self.get_logger().info(response.message)
        return response

    @_guarded
    def _on_save_memory(self, request, response: Trigger.Response) -> Trigger.Response:
        files = [cam for cam in self._cameras.values() if cam.memory_file is not None]
        if not files:
            response.success = False
            response.message = (
                "no memory_file (empty, or the node was not activated with one): nowhere to save"
            )
            return response
        results = [cam.memory_file.save(cam.engine, cam.saved_extra(), flush=True) for cam in files]
        response.success = all(ok for ok, _ in results)
        response.message = "; ".join(message for _, message in results)
        return response

    @_guarded
    def _periodic_save(self):
        """Every save_period_s while active: each camera whose memory or stream moved on since its save."""
        for cam in self._cameras.values():
            if cam.memory_file is not None:
                cam.memory_file.save_if_changed(cam.engine, cam.saved_extra())

    def _on_watch(self, request: Watch.Request, response: Watch.Response) -> Watch.Response:
        """add / remove / list, on the cameras named (empty: all); a refused request changes nothing
        and says why."""
        command = request.command.strip().lower()
        try:
            cams = self._cameras_of(request.cameras, WatchError)
            if command == Watch.Request.ADD:
                added = []
                try:
                    for cam in cams:
                        c = cam.watcher.add(request.condition, float(request.threshold), request.name)
                        added.append(cam)
                except WatchError:
                    for cam in added:  # all cameras or none
                        cam.watcher.remove(c.name)
                    raise
                self.get_logger().info(
                    f"watching {c.name!r}: {_preview(c.text)} (threshold {c.threshold:.3f})"
                    + (f" on {', '.join(cam.name for cam in cams)}" if cams[0].name else "")
                )
            elif command == Watch.Request.REMOVE:
                name = request.name.strip()
                for cam in cams:  # all cameras or none
                    if name not in {c.name for c in cam.watcher.conditions()}:
                        cam.watcher.remove(name)  # raises WatchError naming what is watched
                for cam in cams:
                    cam.watcher.remove(name)
                self.get_logger().info(f"stopped watching {name!r}")
            elif command != Watch.Request.LIST:
                raise WatchError(f"unknown command {request.command!r}: use add, remove or list")
        except WatchError as e:
            response.success, response.error = False, str(e)
            self.get_logger().warning(f"watch {command or '(no command)'} refused: {e}")
            cams = list(self._cameras.values())
        else:
            response.success = True
        for cam in cams:
            for state in cam.watcher.states():
                response.names.append(state.condition.name)
                response.conditions.append(state.condition.text)
                response.thresholds.append(state.condition.threshold)
                response.active.append(state.active)
                response.probabilities.append(math.nan if state.probability is None else state.probability)
                response.condition_cameras.append(cam.name)
        return response

    # ------------------------------------------------------------------ outputs

    def _publish_watch(self, cam: Camera, result: WatchResult):
        """Engine callback (LLM worker thread): every evaluation to ~/watch_scores, each rise or fall
        to ~/events with its evidence (and thumbnails with watch_event_images)."""
        frame_id = cam.frame_id
        header = Header(stamp=_time_msg(result.stamp), frame_id=frame_id)
        self._scores_pub.publish(
            WatchEvaluation(
                header=header,
                names=[s.condition.name for s in result.states],
                probabilities=[s.probability for s in result.states],
                active=[s.active for s in result.states],
                frames_seen=result.frames_seen,
                evaluation_time_s=result.evaluation_s,
                camera=cam.name,
            )
        )
        with_images = self._p["watch_event_images"]
        for event in result.events:
            c = event.condition
            images = [_evidence_image(item, frame_id) for item in event.evidence] if with_images else []
            evidence = [_evidence_msg(item, cam.name) for item in event.evidence]
            self._events_pub.publish(
                WatchEvent(
                    header=header,
                    name=c.name,
                    condition=c.text,
                    threshold=c.threshold,
                    probability=event.probability,
                    rising=event.rising,
                    frames_seen=result.frames_seen,
                    latency_s=time.perf_counter() - result.memory_updated_at,
                    evidence=evidence,
                    evidence_images=images,
                    camera=cam.name,
                )
            )
            self.get_logger().info(
                (f"camera {cam.name!r} " if cam.name else "")
                + f"event: {c.name!r} {'became true' if event.rising else 'is false again'} "
                f"(P(yes) {event.probability:.3f}, threshold {c.threshold:.3f}, {result.frames_seen} frames)"
            )

    def _publish_summary(self, cam: Camera, answer: Answer):
        """Engine callback (LLM worker thread) with a finished periodic summary of one camera."""
        msg = SceneSummary(
            summary=answer.text,
            camera=cam.name,
            frames_seen=answer.frames_seen,
            frames_dropped=cam.engine.stats().frames_dropped,
            first_frame_stamp=_time_msg(answer.first_stamp),
            last_frame_stamp=_time_msg(answer.last_stamp),
            memory_lag_s=_lag(answer),
            generation_time_s=answer.total_s,
        )
        msg.header.stamp, msg.header.frame_id = msg.last_frame_stamp, cam.frame_id
        self._summary_pub.publish(msg)

    def _publish_memory_view(self):
        """Timer: each camera's memory as a picture on its ~/memory_view when it changed since the last."""
        if self._state != "active":
            return
        for cam in list(self._cameras.values()):
            snap = cam.engine.snapshot()
            version = (id(cam.engine), snap.version)
            if version == cam.view_version or cam.view_pub is None:
                continue
            view = cam.engine.memory_view()
            cam.view_version = version
            msg = Image(height=view.image.shape[0], width=view.image.shape[1], encoding="rgb8")
            msg.step, msg.data = view.image.shape[1] * 3, view.image.tobytes()
            msg.header.stamp = (
                _time_msg(cam.engine.stamp_of(snap.last_stamp))
                if snap.frames_seen
                else self.get_clock().now().to_msg()
            )
            msg.header.frame_id = cam.frame_id
            cam.view_pub.publish(msg)

    @_guarded
    def _publish_diagnostics(self):
        """One status per camera ('fvs: ...' for the single unnamed camera, 'fvs/<camera>: ...')."""
        statuses = [self._camera_status(cam) for cam in list(self._cameras.values())]
        if statuses:
            self._diag_pub.publish(
                DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=statuses)
            )

    def _camera_status(self, cam: Camera):
        engine, intake = cam.engine, cam.intake
        s = engine.stats()
        counters = cam.counters()
        memory_problem = cam.memory_file.problem if cam.memory_file is not None else ""
        problems = [
            x
            for x in (
                s.worker_failure,
                self._clock_problem(),
                cam.stamp_news.problem(s.stamp_jumps, s.stamp_note),  # happening now: before older ones
                cam.size_news.problem(s.frame_size_mismatches, s.frame_size_note),
                s.last_error,
                memory_problem,
                self._callback_problem,
                intake and intake.problem,
            )
            if x
        ]
        level, message = cam.health.level(counters, not s.running, problems)
        slots, csm_slots = len(engine.snapshot().csm_weights), engine.memory_config.csm_slots
        device_mem = s.device_memory_bytes
        values = {
            "state": self._state,
            "frames_received": counters.received,
            "frames_unsupported": counters.unsupported,
            "frames_malformed": counters.malformed,
            "frames_restamped": counters.restamped,
            "frames_failed": counters.failed,
            "last_image_problem": intake.problem if intake is not None else "",
            "frames_rejected": s.frames_rejected,
            "frames_skipped_by_sampling": s.frames_skipped,
            "frames_dropped": s.frames_dropped,
            "frames_into_memory": s.frames_into_memory,
            "frames_seen": s.frames_seen,
            "frames_per_slot": engine.config.frames_per_slot,
            "frame_size": "n/a" if s.frame_size is None else f"{s.frame_size[1]}x{s.frame_size[0]}",
            "frame_size_changes": s.frame_size_changes,
            "frame_size_mismatches": s.frame_size_mismatches,
            "stamp_jumps": s.stamp_jumps,
            "queue_depth": s.queue_depth,
            "memory_slots_used": f"{slots}/{csm_slots}",
            "memory_fill": f"{slots / csm_slots:.2f}",
            "memory_file_problem": memory_problem,
            "last_update_s": diagnostics.fmt(s.last_update_s),
            "last_answer_latency_s": diagnostics.fmt(s.last_answer_s),
            "last_time_to_first_token_s": diagnostics.fmt(s.last_ttft_s),
            "questions_waiting": self._asking,
            "questions_answered": s.questions_answered,
            "questions_failed": s.questions_failed,
            "questions_timed_out": s.questions_timed_out,
            "questions_refused_busy": self._busy_refusals,
            "summaries": s.summaries,
            "watched_conditions": len(cam.watcher),
            "watch_evaluations": s.watch_evaluations,
            "last_watch_evaluation_s": diagnostics.fmt(s.last_watch_s),
            "errors": s.errors,
            "callback_errors": self._callback_errors,
            "device_memory_mib": "n/a" if device_mem is None else f"{device_mem / 2**20:.0f}",
            "process_rss_mib": f"{_rss_bytes() / 2**20:.0f}",
        }
        if cam.name:
            values["camera"], values["image_topic"] = cam.name, cam.settings.image_topic
        return diagnostics.status(
            f"{self.get_name()}{'/' + cam.name if cam.name else ''}: Flash-VStream memory",
            self._p["model"],
            level,
            message or self._state,
            values,
        )

    def _clock_problem(self) -> str:
        """Why stamps cannot be checked against the node clock: it reads 0 (use_sim_time, no /clock)."""
        if self._state != "active" or self.get_clock().now().nanoseconds:
            return ""
        return (
            "the node clock reads 0 (use_sim_time without /clock?): frame stamps are not checked "
            "against it and unstamped frames cannot be stamped"
        )

    def note_escaped(self, error: BaseException):
        """Count and log an exception that escaped into the executor (main() keeps spinning)."""
        self._callback_errors += 1
        self._callback_problem = f"executor: {type(error).__name__}: {error}"
        self.get_logger().error(self._callback_problem, throttle_duration_sec=5.0)

    def destroy_node(self):
        logging.getLogger("fvs_ros").removeHandler(self._log_handler)
        super().destroy_node()


class _RosLogHandler(logging.Handler):
    """Forwards the engine's Python logging (warnings and errors) to the node's ROS logger.

    rclpy keys a logger's state by the calling line and refuses a second severity from the same
    line ("Logger severity cannot be changed between calls"), so each severity has a call of its
    own. Like every logging handler, emit never raises into the thread that logged (a worker)."""

    def __init__(self, logger):
        super().__init__(logging.WARNING)
        self.ros_logger = logger

    def emit(self, record):
        try:
            text = f"{record.name}: {record.getMessage()}"
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(text)
            else:
                self.ros_logger.warning(text)
        except Exception:  # noqa: BLE001 - logging's contract: report on stderr, go on
            self.handleError(record)


def _check_request(request: Ask.Request, max_chars: int):
    if not request.question.strip():
        raise QuestionError("question is empty")
    if len(request.question) > max_chars:
        raise QuestionError(
            f"question has {len(request.question)} characters; max_question_chars is {max_chars}"
        )
    if not math.isfinite(request.timeout_s):
        raise QuestionError(
            f"timeout_s must be a finite number of seconds, got {request.timeout_s}: give the longest "
            "wait you accept, or 0 for default_timeout_s"
        )
    if request.timeout_s < 0:
        raise QuestionError(f"timeout_s must be >= 0 seconds (0: default_timeout_s), got {request.timeout_s}")


def _fill_answer(response, answer: Answer, cam: Camera, want_images: bool):
    """An Ask response or action result (the same fields) from an engine Answer."""
    response.success, response.answer = True, answer.text
    response.frames_seen, response.frames_in_memory = answer.frames_seen, answer.frames_in_memory
    response.first_frame_stamp = _time_msg(answer.first_stamp)
    response.last_frame_stamp = _time_msg(answer.last_stamp)
    response.memory_lag_s = _lag(answer)
    response.time_to_first_token_s = answer.ttft_s
    response.num_tokens = answer.num_tokens
    response.evidence = [_evidence_msg(item, cam.name) for item in answer.evidence]
    response.memory_attention = answer.memory_attention
    if want_images:
        response.evidence_images = [_evidence_image(item, cam.frame_id) for item in answer.evidence]


def _evidence_msg(item: EvidenceItem, camera: str) -> Evidence:
    return Evidence(
        camera=camera,
        kind=Evidence.DETAIL if item.kind == DETAIL else Evidence.CONTEXT,
        stamp=_time_msg(item.stamp),
        share=item.share,
        span_start=_time_msg(item.span[0]),
        span_end=_time_msg(item.span[1]),
        weight=item.weight,
        slot=item.slot,
    )


def _evidence_image(item: EvidenceItem, frame_id: str) -> CompressedImage:
    msg = CompressedImage(format="jpeg")
    msg.header.stamp, msg.header.frame_id = _time_msg(item.stamp), frame_id
    if item.image is not None:
        msg.data = encode_jpeg(item.image)
    return msg


def _lag(answer: Answer) -> float:
    """Answer.memory_lag_s for the interface: -1 when the memory was empty."""
    return -1.0 if answer.memory_lag_s is None else answer.memory_lag_s


def _time_msg(seconds: Optional[float]) -> Time:
    """builtin_interfaces/Time of `seconds` (None or 0: zero), the one conversion every stamp the
    node sends goes through. ValueError for a value Time cannot hold (int32 sec, nanosec < 1e9):
    a message must never reach serialization with one (it would fail in the executor, unanswered)."""
    if not seconds:
        return Time()
    if not math.isfinite(seconds):
        raise ValueError(f"stamp {seconds} s is not a time")
    sec = math.floor(seconds)
    nanosec = int(round((seconds - sec) * 1e9))
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    if not -(2**31) <= sec < 2**31:
        raise ValueError(f"stamp {seconds:g} s is outside what builtin_interfaces/Time holds (int32 seconds)")
    return Time(sec=sec, nanosec=nanosec)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _preview(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + f"... ({len(text)} chars)")


def main(args=None):
    """Entry point of `fvs_node` / `python -m fvs_ros.ros.node [--autostart] [--ros-args ...]`."""
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
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    try:
        if options.autostart and node.trigger_configure() == SUCCESS:
            node.trigger_activate()
        while not stop.is_set() and not node.finished.is_set() and rclpy.ok():
            _spin_once(executor, node)
        if node.finished.is_set():  # the shutdown transition: let its reply go out, then end
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and rclpy.ok():
                _spin_once(executor, node, 0.05)
        node.shutdown()
    finally:
        node.finalize()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def _spin_once(executor, node: FvsNode, timeout: float = 0.2):
    """One executor step; an exception a callback let escape is logged and the node goes on (e.g. a
    reply to a service destroyed by cleanup while its callback ran raises InvalidHandle)."""
    try:
        executor.spin_once(timeout_sec=timeout)
    except Exception as e:  # noqa: BLE001 - the process ends only on shutdown
        node.note_escaped(e)


if __name__ == "__main__":
    main()
