"""Image topics in rosbag2 bags, read and written with `rosbags` (mcap or sqlite3).

A bag is a rosbag2 directory (metadata.yaml + storage files) or a single `.mcap` / `.db3` file.

*Stream time* (the time questions are scheduled at) is seconds since the first message on the
image topic, by the bag's own timestamps (receive/log time, what `ros2 bag play` replays by).
Header stamps are what the node sees and what answers report; they are kept separately.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from fvs_ros.bag.images import COMPRESSED, IMAGE, IMAGE_TYPES, encode_compressed, msg_to_rgb, stamp_from_cdr

_STORE = None


class BagError(RuntimeError):
    """A bag that cannot be used (missing, unreadable, no such topic, no frames); one line for the user."""


def typestore():
    """The ROS 2 Kilted typestore (sensor_msgs, std_msgs, rosgraph_msgs, ...), shared."""
    global _STORE
    if _STORE is None:
        _STORE = get_typestore(Stores.ROS2_KILTED)
    return _STORE


@dataclass(frozen=True)
class BagFrame:
    """One image message as stored: raw CDR bytes plus its times."""

    index: int  # 0-based position on the image topic
    log_ns: int  # bag timestamp (ns since epoch), what players replay by
    stream_s: float  # seconds since the first image's log time
    stamp: float  # header stamp, seconds
    raw: bytes  # CDR-serialized message


@dataclass(frozen=True)
class ImageTopicInfo:
    path: str
    storage: str  # mcap | sqlite3
    topic: str
    msgtype: str  # sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage
    count: int  # messages on the topic (from the bag's index)
    first_log_ns: int  # log time of the first image = stream time 0
    first_stamp: float  # header stamp of the first image
    bag_end_s: float  # stream time of the bag's last message on any topic (upper bound for the topic)
    topics: dict = field(default_factory=dict)  # every topic in the bag -> type

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "storage": self.storage,
            "topic": self.topic,
            "msgtype": self.msgtype,
            "count": self.count,
            "first_log_ns": self.first_log_ns,
            "first_stamp": self.first_stamp,
            "bag_end_s": self.bag_end_s,
            "topics": dict(self.topics),
        }


def _storage_name(path: Path) -> str:
    if path.is_file():
        return "mcap" if path.suffix == ".mcap" else "sqlite3"
    return "mcap" if any(path.glob("*.mcap")) else "sqlite3"


class ImageBag:
    """Read-only access to one image topic of a rosbag2 bag.

    topic=None picks the bag's only Image/CompressedImage topic (an error if there are several).
    """

    def __init__(self, path, topic: Optional[str] = None):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"bag {str(self.path)!r} does not exist")
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except Exception as e:  # rosbags raises several types (ReaderError, FileNotFoundError, yaml errors)
            raise BagError(f"cannot open bag {str(self.path)!r}: {type(e).__name__}: {e}") from e
        try:
            self.info = self._inspect(topic)
        except BaseException:
            self._reader.close()
            raise
        self._conns = [c for c in self._reader.connections if c.topic == self.info.topic]

    def _inspect(self, topic: Optional[str]) -> ImageTopicInfo:
        r = self._reader
        topics = {c.topic: c.msgtype for c in r.connections}
        images = sorted(t for t, ty in topics.items() if ty in IMAGE_TYPES)
        listing = ", ".join(f"{t} ({ty})" for t, ty in sorted(topics.items())) or "none"
        if topic is None:
            if len(images) != 1:
                what = (
                    "no image topic"
                    if not images
                    else f"{len(images)} image topics ({', '.join(images)}); pick one with --topic"
                )
                raise BagError(f"bag {str(self.path)!r} has {what}; topics: {listing}")
            topic = images[0]
        if topic not in topics:
            raise BagError(f"bag {str(self.path)!r} has no topic {topic!r}; topics: {listing}")
        msgtype = topics[topic]
        if msgtype not in IMAGE_TYPES:
            raise BagError(
                f"topic {topic!r} in {str(self.path)!r} has type {msgtype}, not an image type "
                f"({' or '.join(IMAGE_TYPES)})"
            )
        conns = [c for c in r.connections if c.topic == topic]
        count = sum(c.msgcount for c in conns)
        first = next(iter(r.messages(connections=conns)), None)
        if first is None:
            raise BagError(f"topic {topic!r} in {str(self.path)!r} has no messages")
        _, log_ns, raw = first
        bag_end_ns = max(r.end_time - 1, log_ns)  # rosbags: end_time is one past the latest message
        return ImageTopicInfo(
            path=str(self.path),
            storage=_storage_name(self.path),
            topic=topic,
            msgtype=msgtype,
            count=count,
            first_log_ns=log_ns,
            first_stamp=stamp_from_cdr(bytes(raw)),
            bag_end_s=(bag_end_ns - log_ns) / 1e9,
            topics=topics,
        )

    def frames(self) -> Iterator[BagFrame]:
        """Every image message in bag order (log time)."""
        t0 = self.info.first_log_ns
        for i, (_, log_ns, raw) in enumerate(self._reader.messages(connections=self._conns)):
            raw = bytes(raw)
            yield BagFrame(i, log_ns, (log_ns - t0) / 1e9, stamp_from_cdr(raw), raw)

    def deserialize(self, frame: BagFrame):
        return typestore().deserialize_cdr(frame.raw, self.info.msgtype)

    def decode(self, frame: BagFrame) -> np.ndarray:
        """RGB uint8 HxWx3 of one frame (ImageDecodeError if it cannot be decoded)."""
        return msg_to_rgb(self.deserialize(frame), self.info.msgtype)

    def close(self):
        self._reader.close()

    def __enter__(self) -> "ImageBag":
        return self

    def __exit__(self, *exc):
        self.close()


class ImageBagWriter:
    """Write RGB frames as sensor_msgs/Image (rgb8) or CompressedImage (jpeg/png) to a new bag.

    out ending in `.mcap` (or `.db3`): a single self-contained storage file; anything else: a
    rosbag2 directory (metadata.yaml + storage file) with the given storage (mcap or sqlite3).
    Log time = header stamp.
    """

    def __init__(
        self,
        out,
        topic: str = "/camera/image_raw",
        compressed: Optional[str] = None,
        storage: str = "mcap",
        frame_id: str = "camera",
        jpeg_quality: int = 90,
        overwrite: bool = False,
    ):
        self.out = Path(out)
        if self.out.suffix == ".mcap":
            storage = "mcap"
        elif self.out.suffix == ".db3":
            storage = "sqlite3"
        if storage not in ("mcap", "sqlite3"):
            raise ValueError(f"storage must be mcap or sqlite3, got {storage!r}")
        if self.out.exists():
            if not overwrite:
                raise BagError(f"{str(self.out)!r} exists already (use --overwrite)")
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        self.single_file = self.out.suffix in (".mcap", ".db3")
        self.topic, self.frame_id, self.jpeg_quality = topic, frame_id, jpeg_quality
        self.compressed = compressed.lower() if compressed else None
        self.msgtype = COMPRESSED if self.compressed else IMAGE
        self.count = 0
        if self.single_file:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
            bag_dir = self._tmp / self.out.stem
        else:
            self._tmp = None
            bag_dir = self.out
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(bag_dir, version=9, storage_plugin=plugin)
        self._writer.open()
        self._bag_dir = bag_dir
        self._conn = self._writer.add_connection(topic, self.msgtype, typestore=typestore())
        ts = typestore().types
        self._Header, self._Time = ts["std_msgs/msg/Header"], ts["builtin_interfaces/msg/Time"]
        self._Msg = ts[self.msgtype]

    def message(self, rgb: np.ndarray, stamp: float):
        """The rosbags message object for one RGB frame."""
        if not (
            isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        ):
            raise ValueError(
                f"frame must be an HxWx3 uint8 RGB array, got {getattr(rgb, 'shape', type(rgb))}"
            )
        sec = int(np.floor(stamp))
        nsec = int(round((stamp - sec) * 1e9))
        if nsec >= 1_000_000_000:
            sec, nsec = sec + 1, nsec - 1_000_000_000
        header = self._Header(stamp=self._Time(sec=sec, nanosec=nsec), frame_id=self.frame_id)
        if self.compressed:
            fmt, data = encode_compressed(rgb, self.compressed, self.jpeg_quality)
            return self._Msg(header=header, format=fmt, data=data)
        h, w = rgb.shape[:2]
        return self._Msg(
            header=header,
            height=h,
            width=w,
            encoding="rgb8",
            is_bigendian=0,
            step=w * 3,
            data=np.ascontiguousarray(rgb).reshape(-1),
        )

    def write(self, rgb: np.ndarray, stamp: float):
        msg = self.message(rgb, stamp)
        log_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self._writer.write(self._conn, log_ns, bytes(typestore().serialize_cdr(msg, self.msgtype)))
        self.count += 1

    def close(self) -> Path:
        """Finish the bag; returns its path (the single file or the directory)."""
        self._writer.close()
        if self._tmp is not None:
            files = [p for p in self._bag_dir.iterdir() if p.suffix == self.out.suffix]
            if len(files) != 1:
                raise BagError(f"expected one {self.out.suffix} file in {self._bag_dir}, found {files}")
            files[0].replace(self.out)
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.out

    def abort(self):
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already failing
            pass
        target = self._tmp if self._tmp is not None else self.out
        shutil.rmtree(target, ignore_errors=True)

    def __enter__(self) -> "ImageBagWriter":
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()
