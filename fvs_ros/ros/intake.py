"""Camera intake for the node: decide from a message's header whether memory wants the frame, then
pay for decoding only those frames.

With `raw_intake` the subscription hands over the serialized message (rclpy `raw=True`): the CDR
header (stamp, sizes, encoding) is read in place with `struct`, the pixel data is never copied for
a frame the sampler skips, and a kept frame's pixels are a zero-copy view of the received bytes.
That subscription lives on a bare node of its own (no parameter services, no rosout) spun by its
own thread (SubscriptionThread): the lifecycle node's MultiThreadedExecutor rebuilds a wait set over
all of its services and timers for every message. Otherwise the lifecycle node subscribes and rclpy
deserializes every message first (the path before issue 15, kept to compare).

Stamps: zero, negative, or more than `max_stamp_ahead_s` ahead of the node clock are not trusted:
the frame is restamped with the node clock when it arrived (counted in `frames_restamped`), so a
camera with a broken clock still feeds memory and one frame stamped years ahead cannot move the
stream clock. Everything else (out of order, jumps back, two clocks, a nanosec >= 1e9 read as the
seconds it says) is the engine's stream clock (fvs_ros/engine/clock.py).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import rclpy
from rclpy.executors import SingleThreadedExecutor

from fvs_ros.engine import EngineError, FrameError
from fvs_ros.ros.image import (
    SHOWN_CHARS,
    MalformedImage,
    UnsupportedEncoding,
    compressed_to_rgb,
    image_to_rgb,
)

MAX_REPORTED_ENCODINGS = 16  # unsupported encodings logged once each; later ones throttled


@dataclass
class ImageView:
    """The fields of a sensor_msgs/Image or CompressedImage read from its CDR bytes (data: a view)."""

    stamp: float
    frame_id: str
    height: int = 0
    width: int = 0
    encoding: str = ""
    is_bigendian: int = 0
    step: int = 0
    format: str = ""
    data: memoryview = memoryview(b"")


class _Cdr:
    """Reads CDR (XCDR1, as ROS 2 serializes) from a buffer; MalformedImage when it runs short."""

    def __init__(self, buf):
        self.buf = memoryview(buf)
        if len(self.buf) < 4 or self.buf[0] != 0 or self.buf[1] not in (0, 1):
            raise MalformedImage("serialized message does not start with a CDR header")
        self.order = "<" if self.buf[1] == 1 else ">"
        self.pos = 4

    def _take(self, fmt: str, size: int):
        self.pos = 4 + ((self.pos - 4 + size - 1) // size) * size  # alignment is relative to the header
        if self.pos + size > len(self.buf):
            raise MalformedImage("serialized message is truncated")
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self) -> int:
        return self._take("I", 4)

    def i32(self) -> int:
        return self._take("i", 4)

    def u8(self) -> int:
        return self._take("B", 1)

    def octets(self) -> memoryview:
        n = self.u32()
        if self.pos + n > len(self.buf):
            raise MalformedImage(f"serialized message declares {n} bytes past its end")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def string(self) -> str:
        return bytes(self.octets()).rstrip(b"\0").decode("utf-8", "replace")


def parse_image(buf, compressed: bool) -> ImageView:
    """Read a serialized sensor_msgs/Image (or CompressedImage) without copying its pixel data."""
    r = _Cdr(buf)
    stamp = r.i32() + r.u32() * 1e-9
    frame_id = r.string()
    if compressed:
        fmt = r.string()
        return ImageView(stamp, frame_id, format=fmt, data=r.octets())
    height, width, encoding = r.u32(), r.u32(), r.string()
    is_bigendian, step = r.u8(), r.u32()
    return ImageView(stamp, frame_id, height, width, encoding, is_bigendian, step, data=r.octets())


@dataclass
class IntakeCounters:
    """Frames as the node's subscription saw them (the engine counts what happened next)."""

    received: int = 0
    unsupported: int = 0
    malformed: int = 0
    restamped: int = 0
    rejected: int = 0  # refused by the engine (FrameError: unusable size or stamp)
    failed: int = 0  # an unexpected error while handling the message (a bug: logged with its reason)

    @classmethod
    def from_saved(cls, saved) -> dict:
        """The counters of a saved state() that are counters (a damaged or older file adds nothing)."""
        if not isinstance(saved, dict):
            return {}
        return {
            k: v
            for k, v in saved.items()
            if k in cls.__dataclass_fields__ and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }


class ImageIntake:
    """Turns image messages into engine frames; every failure is counted and never raised."""

    def __init__(
        self,
        engine,
        compressed: bool,
        now: Callable[[], float],
        logger,
        max_stamp_ahead_s: float,
        max_pixels: int,
        counters: Optional[dict] = None,
    ):
        self.engine, self.compressed, self.now, self.logger = engine, compressed, now, logger
        self.max_stamp_ahead_s, self.max_pixels = max_stamp_ahead_s, max_pixels
        self.counters = IntakeCounters(**(counters or {}))
        self.problem = ""  # the latest reason a frame was not used, for diagnostics
        self.frame_id = ""
        self._reported_encodings: set = set()

    def state(self) -> dict:
        return asdict(self.counters)

    def on_serialized(self, data: bytes):
        """Subscription callback with raw=True: the message's serialized bytes."""
        self._handle(lambda: parse_image(data, self.compressed))

    def on_message(self, msg):
        """Subscription callback of a deserialized Image / CompressedImage."""
        self._handle(lambda: msg)

    def _handle(self, parse):
        self.counters.received += 1
        try:
            msg = parse()
            self.frame_id = msg.header.frame_id if hasattr(msg, "header") else msg.frame_id
            stamp = self._stamp(msg)
            if not self.engine.offer(stamp):
                return  # skipped by the sampler: never decoded
            frame = self._decode(msg)
            self.engine.add_frame(frame, stamp)
        except UnsupportedEncoding as e:
            self.counters.unsupported += 1
            self.problem = str(e)
            self._report_unsupported(msg.encoding, e)
        except MalformedImage as e:
            self.counters.malformed += 1
            self.problem = str(e)
            self.logger.warning(
                f"malformed image dropped ({self.counters.malformed} so far): {e}", throttle_duration_sec=5.0
            )
        except FrameError as e:
            self.counters.rejected += 1
            self.problem = str(e)
            self.logger.warning(f"frame rejected: {e}", throttle_duration_sec=5.0)
        except EngineError:  # the engine stopped under this callback (cleanup, shutdown)
            pass
        except Exception as e:  # noqa: BLE001 - one message must never end intake
            self.counters.failed += 1
            self.problem = f"internal error: {type(e).__name__}: {e}"
            self.logger.error(f"image callback failed: {self.problem}", throttle_duration_sec=5.0)

    def _report_unsupported(self, encoding: str, error: UnsupportedEncoding):
        """Log each of the first MAX_REPORTED_ENCODINGS unsupported encodings once; later new ones at
        most every 5 s. The set remembered is bounded (cut names), so a sender inventing a new
        encoding per frame costs neither memory nor log volume."""
        key = encoding[:SHOWN_CHARS]
        if key in self._reported_encodings:
            return
        if len(self._reported_encodings) < MAX_REPORTED_ENCODINGS:
            self._reported_encodings.add(key)
            self.logger.error(f"{error}; frames in this encoding are ignored")
        else:
            self.logger.error(
                f"{error}; frames in this encoding are ignored (over {MAX_REPORTED_ENCODINGS} unsupported "
                "encodings seen: further ones are logged at most every 5 s)",
                throttle_duration_sec=5.0,
            )

    def _stamp(self, msg) -> float:
        stamp = (
            msg.stamp
            if isinstance(msg, ImageView)
            else msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        )
        now = self.now()
        if stamp > 0 and (now <= 0 or stamp <= now + self.max_stamp_ahead_s):
            return stamp
        if stamp != 0:  # zero: the usual "not stamped", not worth a warning
            self.counters.restamped += 1
            self.problem = (
                f"stamp {stamp:.3f} s is {'not positive' if stamp < 0 else 'ahead of the clock'} "
                f"(now {now:.3f} s, max_stamp_ahead_s {self.max_stamp_ahead_s:g}): restamped with the clock"
            )
            self.logger.warning(self.problem, throttle_duration_sec=5.0)
        return now

    def _decode(self, msg):
        if self.compressed:  # a JPEG is decoded no larger than the model's input needs
            return compressed_to_rgb(msg, self.max_pixels, target=self.engine.lm.frame_size)
        return image_to_rgb(msg, self.max_pixels)


class SubscriptionThread:
    """One subscription on a bare node of its own, spun by its own thread and executor.

    The node ignores the process's command-line arguments: a `__node:=` remap there (what launch
    passes) would give it the lifecycle node's name, two nodes of one name in the graph. So it is
    named `name` in `namespace` exactly, and `topic` comes resolved (the caller's remaps applied)."""

    def __init__(self, context, name: str, namespace: str, msg_type, topic: str, callback, qos, raw: bool):
        self.node = rclpy.create_node(
            name,
            namespace=namespace,
            context=context,
            use_global_arguments=False,
            start_parameter_services=False,
            enable_rosout=False,
        )
        self.subscription = self.node.create_subscription(msg_type, topic, callback, qos, raw=raw)
        self.topic_name = self.subscription.topic_name
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="fvs-image-intake", daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop.is_set() and self.node.context.ok():
            self._executor.spin_once(timeout_sec=0.1)  # the callback (ImageIntake) never raises

    def close(self):
        self._stop.set()
        self._thread.join()
        self._executor.shutdown()
        self.node.destroy_node()
