"""The ~/ask_stream action server: the Ask service's answer, streamed as it is generated.

The node hands it one function, `answer(request, response, on_token, cancel) -> cancelled`,
which fills an Ask response (the action's result has the same fields); this module owns the
rclpy action server, the goals' cancel events and the limit on goals running at once.
"""

from __future__ import annotations

import threading
from typing import Callable

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup

from fvs_ros.action import Ask as AskAction

# Goals executing at once: each holds an executor thread while its answer streams; more are
# rejected, so images, services and cancel requests always find a thread (node.EXECUTOR_THREADS).
MAX_GOALS = 3


class AskStreamServer:
    """fvs_ros/action/Ask on `name`: feedback = the text so far; cancel stops the generation at its
    next token (the engine drops the request); result = the Ask response."""

    def __init__(self, node, name: str, answer: Callable):
        self._node, self._answer = node, answer
        self._cancels: dict[bytes, threading.Event] = {}  # goal id -> its engine request's cancel
        self._goals = 0  # accepted goals not finished yet
        self._lock = threading.Lock()
        self._server = ActionServer(
            node,
            AskAction,
            name,
            self._execute,
            goal_callback=self._on_goal,
            cancel_callback=self._on_cancel,
            callback_group=ReentrantCallbackGroup(),  # a goal's cancel runs while its answer streams
        )

    def destroy(self) -> None:
        """Stop: goals under way end at their next token, then the server goes."""
        for cancel in list(self._cancels.values()):
            cancel.set()
        self._server.destroy()

    def _on_goal(self, request) -> GoalResponse:
        with self._lock:
            if self._goals >= MAX_GOALS:
                self._node.get_logger().warning(
                    f"~/ask_stream: {MAX_GOALS} goals already running; goal rejected",
                    throttle_duration_sec=5.0,
                )
                return GoalResponse.REJECT
            self._goals += 1
        return GoalResponse.ACCEPT

    def _on_cancel(self, goal) -> CancelResponse:
        cancel = self._cancels.get(bytes(goal.goal_id.uuid))
        if cancel is not None:
            cancel.set()
        return CancelResponse.ACCEPT

    def _execute(self, goal) -> AskAction.Result:
        result, key = AskAction.Result(), bytes(goal.goal_id.uuid)
        cancel, text = threading.Event(), []
        self._cancels[key] = cancel

        def on_token(piece: str):  # engine's LLM worker thread
            text.append(piece)
            goal.publish_feedback(AskAction.Feedback(text="".join(text), num_tokens=len(text)))

        try:
            cancelled = self._answer(goal.request, result, on_token, cancel)
        finally:
            self._cancels.pop(key, None)
            with self._lock:
                self._goals -= 1
        if cancelled:  # answer() filled in what was generated, and from which memory
            result.partial = bool(result.answer)
        try:
            if cancelled and goal.is_cancel_requested:
                goal.canceled()
            elif result.success:
                goal.succeed()
            else:
                goal.abort()
        except Exception as e:  # noqa: BLE001 - deactivate destroyed the server under this goal
            self._node.get_logger().warning(f"~/ask_stream: goal ended after the action server stopped: {e}")
        return result
