"""One camera of the node: its stream on the shared model, image intake, subscription and memory_file.

The node (node.py) holds one Camera per name of its `cameras` parameter, or a single unnamed one
on `image_topic` without it; each keeps its own memory, intake counters, health, memory_file
subdirectory and watched conditions, so one camera's images, errors and saves never touch
another's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from fvs_ros.engine import StreamEngine
from fvs_ros.engine.persistence import ForeignPath
from fvs_ros.engine.watch import Watcher, WatchError
from fvs_ros.ros import diagnostics
from fvs_ros.ros.intake import ImageIntake, IntakeCounters, SubscriptionThread
from fvs_ros.ros.memory_file import MemoryFile
from fvs_ros.ros.params import CameraSettings


def camera_memory_dir(memory_file: str, name: str) -> str:
    """A camera's memory_file directory: the parameter itself for the unnamed camera, else its
    subdirectory <memory_file>/<name>, so the parameter is a directory of cameras; '' = off."""
    if not memory_file or not name:
        return memory_file
    return os.path.join(memory_file, name)


class Camera:
    """A camera's parts; the node drives them through its lifecycle transitions."""

    def __init__(self, settings: CameraSettings, watcher: Watcher):
        self.settings, self.name = settings, settings.name
        self.watcher = watcher
        self.engine: Optional[StreamEngine] = (
            None  # the node opens it on its host (callbacks name this camera)
        )
        self.intake: Optional[ImageIntake] = None
        self.subscription = None  # a SubscriptionThread (raw_intake) or an rclpy subscription
        self.memory_file: Optional[MemoryFile] = None  # from memory_file at activate; None: off
        self.intake_state: dict = {}  # intake counters restored with memory_file, or kept across deactivate
        self.health = diagnostics.Health()
        self.stamp_news, self.size_news = diagnostics.Recent(), diagnostics.Recent()  # WARN while recent
        self.view_pub = None  # ~/memory_view (one camera) or ~/<name>/memory_view
        self.view_version = None  # memory version of the last view published

    @property
    def frame_id(self) -> str:
        """frame_id of this camera's latest image ('' before the first)."""
        return self.intake.frame_id if self.intake is not None else ""

    def memory_dir(self, memory_file: str) -> str:
        """This camera's memory_file directory (camera_memory_dir)."""
        return camera_memory_dir(memory_file, self.name)

    # ------------------------------------------------------------------ activate / deactivate

    def activate(self, node, p: dict, image_group) -> str:
        """Restore memory_file and conditions, then subscribe; returns a line saying what it watches."""
        path = self.memory_dir(p["memory_file"])
        logger = node.get_logger()
        self.memory_file = MemoryFile(path, logger) if path else None
        if self.memory_file is not None:
            try:
                extra = self.memory_file.restore(self.engine)
            except ForeignPath:  # not ours: never read, moved aside or written (the node fails activate)
                self.memory_file = None
                raise
            if "intake" in extra:
                self.intake_state = IntakeCounters.from_saved(extra["intake"])
        self.restore_conditions(path, logger)  # merged with those added since configure
        s = self.settings
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=p["qos_depth"],
            reliability=(
                ReliabilityPolicy.RELIABLE if s.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
            ),
        )
        compressed = s.image_transport == "compressed"
        msg_type = CompressedImage if compressed else Image
        topic = s.image_topic.rstrip("/") + "/compressed" if compressed else s.image_topic
        self.intake = ImageIntake(
            self.engine,
            compressed,
            now=lambda: node.get_clock().now().nanoseconds * 1e-9,
            logger=logger,
            max_stamp_ahead_s=p["max_stamp_ahead_s"],
            max_pixels=p["max_image_pixels"],
            counters=self.intake_state,
        )
        if p["raw_intake"]:
            self.subscription = SubscriptionThread(
                node.context,
                f"{node.get_name()}_intake" + (f"_{self.name}" if self.name else ""),
                node.get_namespace(),
                msg_type,
                node.resolve_topic_name(topic),  # the node's remaps apply; the intake node has none
                self.intake.on_serialized,
                qos,
                True,
            )
        else:
            self.subscription = node.create_subscription(
                msg_type, topic, self.intake.on_message, qos, callback_group=image_group
            )
        label = f"camera {self.name!r}: " if self.name else ""
        return (
            f"{label}watching {self.subscription.topic_name} ({msg_type.__name__}, {s.reliability}, "
            f"depth {p['qos_depth']})"
        )

    def restore_conditions(self, path: str, logger):
        """This camera's watched conditions from its memory_file directory (merged with those added)."""
        try:
            n = self.watcher.open(Path(path).expanduser() if path else None)
        except (WatchError, OSError) as e:  # a bad file must not keep the camera down
            logger.error(f"cannot restore watched conditions from {path}: {e}")
            return
        if n:
            logger.info(f"{n} watched condition(s) restored from {path}")

    def deactivate(self, node):
        """Stop intake and save memory_file (flushing queued frames)."""
        if self.subscription is not None:
            if isinstance(self.subscription, SubscriptionThread):
                self.subscription.close()
            else:
                node.destroy_subscription(self.subscription)
            self.subscription = None
        if self.intake is not None:
            self.intake_state = self.intake.state()
        if self.memory_file is not None:
            self.memory_file.save(self.engine, self.saved_extra(), flush=True)

    def saved_extra(self) -> dict:
        """What the node saves beside the engine's state: this camera's intake counters."""
        return {"intake": self.intake.state() if self.intake is not None else self.intake_state}

    def reset(self) -> int:
        """Forget this camera's stream; the frames forgotten."""
        forgotten = self.engine.stats().frames_seen
        self.engine.reset()
        if self.intake is not None:
            self.intake.counters = type(self.intake.counters)()
            self.intake.problem = ""
        self.intake_state = {}
        return forgotten

    def counters(self) -> IntakeCounters:
        return self.intake.counters if self.intake is not None else IntakeCounters(**self.intake_state)
