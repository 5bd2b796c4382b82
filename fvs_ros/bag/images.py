"""Image messages in bags: RGB -> CompressedImage encoding, decoding, header stamps from raw CDR.

Decoding is the node's (fvs_ros.ros.image); it works on messages deserialized by `rosbags`
as well as on rclpy messages (same field names).
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)


class ImageDecodeError(ValueError):
    """An image message that cannot be turned into an RGB frame (the message says why)."""


def msg_to_rgb(msg, msgtype: str) -> np.ndarray:
    """Image or CompressedImage message object -> RGB uint8 HxWx3.

    Uses the node's own conversion (fvs_ros.ros.image), so offline replay decodes exactly what
    the node would see live.
    """
    from fvs_ros.ros import image as ros_image

    try:
        if msgtype == IMAGE:
            return ros_image.image_to_rgb(msg)
        if msgtype == COMPRESSED:
            return ros_image.compressed_to_rgb(msg)
    except ros_image.ImageError as e:
        raise ImageDecodeError(str(e)) from e
    raise ImageDecodeError(f"{msgtype} is not an image type ({', '.join(IMAGE_TYPES)})")


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", jpeg_quality: int = 90) -> tuple[str, np.ndarray]:
    """RGB uint8 -> (CompressedImage.format, data bytes as uint8 array), as image_transport writes them."""
    fmt = fmt.lower()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        fmt = "jpeg"
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"compression format must be jpeg or png, got {fmt!r}")
    if not ok:
        raise ImageDecodeError(f"OpenCV could not encode a {rgb.shape} frame as {fmt}")
    return f"rgb8; {fmt} compressed bgr8", buf.reshape(-1)


def stamp_from_cdr(raw: bytes) -> float:
    """Header stamp (seconds) of a serialized Image/CompressedImage without deserializing it.

    Both messages start with std_msgs/Header, whose first fields are int32 sec, uint32 nanosec,
    right after the 4-byte CDR encapsulation header (byte 1: 0 = big, 1 = little endian).
    """
    if len(raw) < 12:
        raise ImageDecodeError(f"serialized message too short ({len(raw)} bytes)")
    order = "<" if raw[1] & 1 else ">"
    sec = int.from_bytes(raw[4:8], "little" if order == "<" else "big", signed=True)
    nsec = int.from_bytes(raw[8:12], "little" if order == "<" else "big", signed=False)
    return sec + nsec * 1e-9
