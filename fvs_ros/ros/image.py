"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy frames (no ROS node, no model).

Everything is converted here with numpy/OpenCV (no cv_bridge: PyPI's, ROS 1's, ignores `step`,
cannot convert 16-bit, YUV or Bayer images, and fails on big-endian ones under NumPy 2).
Raw images honour `step` (padded rows) and `is_bigendian`. Compressed images are JPEG or PNG,
recognised by their magic bytes; their size is read from the header (PNG IHDR, JPEG SOF) and
checked against `max_pixels` before anything is decoded. A small file declaring a huge image
costs nothing: a PNG too short for its declared size is refused unread, and a JPEG is decoded
(libjpeg-turbo through simplejpeg) at the DCT scale the model's input size needs and refused on
any decoder warning (data missing from the picture). Strings a sender controls (encoding,
format) are cut short in messages. Messages only need the fields (duck typing): rclpy messages, rosbags
messages and fvs_ros.ros.intake's zero-copy views all work.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

import cv2
import numpy as np
import simplejpeg


class ImageError(ValueError):
    """A message that cannot become a frame."""


class UnsupportedEncoding(ImageError):
    """The encoding is valid ROS but not one this module converts."""


class MalformedImage(ImageError):
    """Sizes and data disagree, the image is over the size limit, or compressed data does not decode."""


MAX_PIXELS = 8192 * 8192  # default size limit (pixels) of one image, raw or compressed
SHOWN_CHARS = 64  # an encoding or format string is shown (logs, errors) up to this many characters
Target = Callable[[int, int], tuple[int, int]]  # (height, width) -> the (height, width) it becomes


def shown(text: str) -> str:
    """`text` quoted for a message, cut to SHOWN_CHARS: a sender's string never floods a log."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


# encoding -> (bytes per pixel, numpy dtype, channels, OpenCV conversion to RGB or None)
_PACKED = {
    "rgb8": (3, np.uint8, 3, None),
    "bgr8": (3, np.uint8, 3, cv2.COLOR_BGR2RGB),
    "8UC3": (3, np.uint8, 3, cv2.COLOR_BGR2RGB),  # OpenCV's own type: BGR by its convention
    "rgba8": (4, np.uint8, 4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, 4, cv2.COLOR_BGRA2RGB),
    "8UC4": (4, np.uint8, 4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, 1, cv2.COLOR_GRAY2RGB),
    "8UC1": (1, np.uint8, 1, cv2.COLOR_GRAY2RGB),
    "mono16": (2, np.uint16, 1, cv2.COLOR_GRAY2RGB),
    "16UC1": (2, np.uint16, 1, cv2.COLOR_GRAY2RGB),
    "uyvy": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_UYVY),  # ROS's older name for uyvy
    "yuyv": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_YUYV),
    "yuv422_yuy2": (2, np.uint8, 2, cv2.COLOR_YUV2RGB_YUYV),  # ROS's older name for yuyv
}
# Bayer mosaics, named by ROS after their first row; OpenCV names them after the second row's
# second and third pixels, hence ROS rggb = OpenCV BG (checked by test_ros_image on solid colours).
_BAYER_CODES = {
    "rggb": cv2.COLOR_BayerBG2RGB,
    "bggr": cv2.COLOR_BayerRG2RGB,
    "gbrg": cv2.COLOR_BayerGR2RGB,
    "grbg": cv2.COLOR_BayerGB2RGB,
}
for _pattern, _code in _BAYER_CODES.items():
    _PACKED[f"bayer_{_pattern}8"] = (1, np.uint8, 1, _code)
    _PACKED[f"bayer_{_pattern}16"] = (2, np.uint16, 1, _code)
# 4:2:0 semi-planar: a full-resolution Y plane, then a half-height interleaved chroma plane.
_PLANAR = {"nv12": cv2.COLOR_YUV2RGB_NV12, "nv21": cv2.COLOR_YUV2RGB_NV21}
_PAIRED = ("uyvy", "yuv422", "yuyv", "yuv422_yuy2")  # 4:2:2: two pixels share one chroma pair

SUPPORTED_ENCODINGS = tuple(_PACKED) + tuple(_PLANAR)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_to_rgb(msg, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Convert a sensor_msgs/Image to an HxWx3 RGB uint8 array (shares no memory with msg)."""
    encoding = msg.encoding
    if encoding not in _PACKED and encoding not in _PLANAR:
        raise UnsupportedEncoding(
            f"encoding {shown(encoding)} is not supported (supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    _check_size(msg.width, msg.height, max_pixels)
    if encoding in _PLANAR:
        return _planar_to_rgb(msg, encoding)
    bpp, dtype, channels, code = _PACKED[encoding]
    if encoding in _PAIRED and msg.width % 2:
        raise MalformedImage(f"{encoding} image width {msg.width} is odd (4:2:2 pairs pixels)")
    if encoding.startswith("bayer_") and (msg.width < 2 or msg.height < 2):
        raise MalformedImage(f"{encoding} image {msg.width}x{msg.height} is smaller than one 2x2 mosaic cell")
    rows = _rows(msg, msg.height, msg.width * bpp)
    pixels = rows.view(np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<"))
    pixels = pixels.reshape(msg.height, msg.width, channels)
    if dtype is np.uint16:  # full 16-bit range -> 8 bits, rounded (as cv_bridge scales mono16)
        pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if code is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), code)


def compressed_to_rgb(msg, max_pixels: int = MAX_PIXELS, target: Optional[Target] = None) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) to an HxWx3 RGB uint8 array.

    The declared size is read from the header and checked before decoding: against `max_pixels`,
    and, for PNG, against what its data can hold (deflate packs at most ~1032 bytes into one, so a
    few bytes declaring a huge image are refused unread). A JPEG is decoded at the smallest DCT
    scale (libjpeg-turbo's n/8) that is still at least `target(height, width)` on both sides (the
    size the caller resizes to: the model's input size), so its cost follows what the model needs,
    not what the header claims; any libjpeg warning (premature end of data, a corrupt segment:
    data missing from the picture) refuses it, never returning a partly grey frame."""
    data = np.frombuffer(msg.data, np.uint8)
    fmt = shown(msg.format)
    if data.size == 0:
        raise MalformedImage(f"compressed image ({fmt}) has no data")
    try:
        width, height = compressed_size(data)
    except MalformedImage as e:
        raise MalformedImage(f"compressed image ({fmt}, {data.size} bytes) does not decode: {e}") from None
    _check_size(width, height, max_pixels)
    if data[0] == 0xFF:
        return _decode_jpeg(data, width, height, target, fmt)
    need = _png_min_bytes(data, width, height)
    if data.size < need:
        raise MalformedImage(
            f"compressed image ({fmt}) declares a {width}x{height} PNG in {data.size} bytes; "
            f"a complete one needs at least {need}"
        )
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise MalformedImage(f"compressed image ({fmt}, {data.size} bytes) does not decode: {e}") from None
    if image is None:
        raise MalformedImage(f"compressed image ({fmt}, {data.size} bytes) does not decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_jpeg(data: np.ndarray, width: int, height: int, target: Optional[Target], fmt: str) -> np.ndarray:
    min_h = min_w = 0
    if target is not None:
        try:
            min_h, min_w = (int(v) for v in target(height, width))
        except Exception:  # noqa: BLE001 - no size the model can use: decode in full, the caller refuses it
            min_h = min_w = 0
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True)
    except ValueError as e:
        raise MalformedImage(f"compressed image ({fmt}, {data.size} bytes) does not decode: {e}") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_DEFLATE_MAX_RATIO = 1032  # deflate codes at most 258 bytes in about 2 bits


def _png_min_bytes(data: np.ndarray, width: int, height: int) -> int:
    """Fewest bytes a complete PNG of this IHDR can have: its filtered rows, deflated at best."""
    depth, colour = int(data[24]), int(data[25])
    row = 1 + (width * _PNG_CHANNELS.get(colour, 1) * depth + 7) // 8  # filter byte + samples
    return height * row // _DEFLATE_MAX_RATIO


def compressed_size(data) -> tuple[int, int]:
    """(width, height) declared by a PNG or JPEG header, without decoding; MalformedImage otherwise."""
    head = bytes(data[:33])
    if head.startswith(_PNG_MAGIC):
        if len(head) < 26 or head[12:16] != b"IHDR":
            raise MalformedImage("PNG without an IHDR header")
        return struct.unpack(">II", head[16:24])
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    raise MalformedImage(f"compressed data is neither JPEG nor PNG (starts with {head[:8].hex()})")


def _jpeg_size(data) -> tuple[int, int]:
    """Walk the JPEG marker segments up to the first start-of-frame (SOF) and read its size."""
    n, i = len(data), 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise MalformedImage(f"JPEG marker expected at byte {i}")
        marker = int(data[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = (int(data[i + 2]) << 8) | int(data[i + 3])
        if length < 2:
            raise MalformedImage(f"JPEG segment length {length} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height = (int(data[i + 5]) << 8) | int(data[i + 6])
            width = (int(data[i + 7]) << 8) | int(data[i + 8])
            return width, height
        i += 2 + length
    raise MalformedImage("JPEG without a frame header (SOF) before its image data")


def _check_size(width: int, height: int, max_pixels: int):
    if width == 0 or height == 0:
        raise MalformedImage(f"image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise MalformedImage(f"image {width}x{height} is over the size limit of {max_pixels} pixels")


def _rows(msg, height: int, row_bytes: int) -> np.ndarray:
    """The image's bytes as a (height, row_bytes) array with any row padding cut off."""
    if msg.step < row_bytes:
        raise MalformedImage(
            f"step {msg.step} is smaller than one row of {msg.encoding} "
            f"pixels ({row_bytes} bytes for width {msg.width})"
        )
    need = msg.step * height
    data = np.frombuffer(msg.data, np.uint8)
    if data.size < need:
        raise MalformedImage(f"data has {data.size} bytes, step*height needs {need}")
    return data[:need].reshape(height, msg.step)[:, :row_bytes]


def _planar_to_rgb(msg, encoding: str) -> np.ndarray:
    if msg.width % 2 or msg.height % 2:
        raise MalformedImage(f"{encoding} image {msg.width}x{msg.height} has an odd side (4:2:0)")
    rows = _rows(msg, msg.height * 3 // 2, msg.width)
    return cv2.cvtColor(np.ascontiguousarray(rows), _PLANAR[encoding])
