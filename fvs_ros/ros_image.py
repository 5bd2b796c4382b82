"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy frames (no ROS node, no model).

Raw images honour `step` (padded rows) and `is_bigendian`. Dense rgb8/bgr8/rgba8/bgra8/mono8
go through cv_bridge when it is importable; mono16, YUV 4:2:2/4:2:0 and padded rows go
through numpy/OpenCV, because the cv_bridge on PyPI (ROS 1's) ignores `step` and cannot
convert those. Compressed images are decoded with OpenCV (jpeg, png, anything imdecode reads).
"""

from __future__ import annotations

import cv2
import numpy as np

try:
    from cv_bridge import CvBridge
except ImportError:  # a ROS install without cv_bridge: numpy handles every encoding
    CvBridge = None


class ImageError(ValueError):
    """A message that cannot become a frame."""


class UnsupportedEncoding(ImageError):
    """The encoding is valid ROS but not one this module converts."""


class MalformedImage(ImageError):
    """Sizes and data disagree, or compressed data does not decode."""


# encoding -> (bytes per pixel, numpy dtype, channels, OpenCV conversion to RGB or None)
_PACKED = {
    "rgb8": (3, np.uint8, 3, None),
    "bgr8": (3, np.uint8, 3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.uint8, 4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, 4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, 1, cv2.COLOR_GRAY2RGB),
    "mono16": (2, np.uint16, 1, cv2.COLOR_GRAY2RGB),
    "uyvy": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_UYVY),  # ROS's older name for uyvy
    "yuyv": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_YUYV),
    "yuv422_yuy2": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_YUYV),  # ROS's older name for yuyv
}
# 4:2:0 semi-planar: a full-resolution Y plane, then a half-height interleaved chroma plane.
_PLANAR = {"nv12": cv2.COLOR_YUV2RGB_NV12, "nv21": cv2.COLOR_YUV2RGB_NV21}
_BRIDGED = {"rgb8", "bgr8", "rgba8", "bgra8", "mono8"}  # where PyPI's cv_bridge is correct

SUPPORTED_ENCODINGS = tuple(_PACKED) + tuple(_PLANAR)

_bridge = CvBridge() if CvBridge is not None else None


def image_to_rgb(msg) -> np.ndarray:
    """Convert a sensor_msgs/Image to an HxWx3 RGB uint8 array (may share no memory with msg)."""
    encoding = msg.encoding
    if encoding in _PLANAR:
        return _planar_to_rgb(msg, encoding)
    if encoding not in _PACKED:
        raise UnsupportedEncoding(
            f"encoding '{msg.encoding}' is not supported (supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    bpp, dtype, channels, code = _PACKED[encoding]
    if encoding in ("uyvy", "yuv422", "yuyv", "yuv422_yuy2") and msg.width % 2:
        raise MalformedImage(f"{encoding} image width {msg.width} is odd (4:2:2 pairs pixels)")
    rows = _rows(msg, msg.height, msg.width * bpp)
    if _bridge is not None and encoding in _BRIDGED and msg.step == msg.width * bpp:
        return np.asarray(_bridge.imgmsg_to_cv2(msg, "rgb8"))
    pixels = rows.view(np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<"))
    pixels = pixels.reshape(msg.height, msg.width, channels)
    if dtype is np.uint16:  # full 16-bit range -> 8 bits, rounded (as cv_bridge scales mono16)
        pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if code is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), code)


def compressed_to_rgb(msg) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg, png, ...) to an HxWx3 RGB uint8 array."""
    if len(msg.data) == 0:
        raise MalformedImage(f"compressed image ('{msg.format}') has no data")
    image = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise MalformedImage(f"compressed image ('{msg.format}', {len(msg.data)} bytes) does not decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _rows(msg, height: int, row_bytes: int) -> np.ndarray:
    """The image's bytes as a (height, row_bytes) array with any row padding cut off."""
    if height == 0 or msg.width == 0:
        raise MalformedImage(f"image is empty ({msg.width}x{msg.height})")
    if msg.step < row_bytes:
        raise MalformedImage(
            f"step {msg.step} is smaller than one row of {msg.encoding} "
            f"pixels ({row_bytes} bytes for width {msg.width})"
        )
    need = msg.step * height
    if len(msg.data) < need:
        raise MalformedImage(f"data has {len(msg.data)} bytes, step*height needs {need}")
    data = np.frombuffer(msg.data, np.uint8, count=need)
    return data.reshape(height, msg.step)[:, :row_bytes]


def _planar_to_rgb(msg, encoding: str) -> np.ndarray:
    if msg.width % 2 or msg.height % 2:
        raise MalformedImage(f"{encoding} image {msg.width}x{msg.height} has an odd side (4:2:0)")
    rows = _rows(msg, msg.height * 3 // 2, msg.width)
    return cv2.cvtColor(np.ascontiguousarray(rows), _PLANAR[encoding])
