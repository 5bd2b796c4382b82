"""Image message -> RGB conversion for every supported encoding (pure functions, no DDS)."""

import struct
import zlib

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from fvs_ros.ros import image as ros_image
from fvs_ros.ros.image import MalformedImage, UnsupportedEncoding, compressed_to_rgb, image_to_rgb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)


def make_image(encoding, pixels, step=None, bigendian=False, height=None, width=None):
    """An Image whose rows are `pixels` rows (bytes), padded to `step` if given."""
    rows = np.ascontiguousarray(pixels).view(np.uint8).reshape(pixels.shape[0], -1)
    step = step or rows.shape[1]
    padded = np.zeros((rows.shape[0], step), np.uint8)
    padded[:, : rows.shape[1]] = rows
    msg = Image(
        encoding=encoding,
        height=height or pixels.shape[0],
        width=width or pixels.shape[1],
        step=step,
        is_bigendian=bigendian,
    )
    msg.data = padded.tobytes()
    return msg


def yuv_to_rgb_bt601(y, u, v):
    """Reference: BT.601 video-range YCbCr -> RGB (what camera YUV formats carry)."""
    y, u, v = (np.asarray(c, np.float64) for c in (y, u, v))
    r = 1.164 * (y - 16) + 1.596 * (v - 128)
    g = 1.164 * (y - 16) - 0.392 * (u - 128) - 0.813 * (v - 128)
    b = 1.164 * (y - 16) + 2.017 * (u - 128)
    return np.clip(np.round(np.stack([r, g, b], -1)), 0, 255)


def smooth_rgb():
    """A smooth image, so JPEG loses little."""
    y, x = np.mgrid[0:8, 0:12]
    return np.stack([x * 20, y * 30, 255 - x * 10], -1).astype(np.uint8)


H, W = 6, 8
Y = RNG.integers(16, 236, (H, W), dtype=np.uint8)
U = RNG.integers(16, 241, (H, W // 2), dtype=np.uint8)  # one chroma pair per two pixels (4:2:2)
V = RNG.integers(16, 241, (H, W // 2), dtype=np.uint8)


@pytest.mark.parametrize("step", [None, 40])  # dense rows, and rows padded to 40 bytes
@pytest.mark.parametrize(
    "encoding,pixels,expected",
    [
        ("rgb8", RGB, RGB),
        ("bgr8", RGB[..., ::-1], RGB),
        ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)]), RGB),
        ("bgra8", np.dstack([RGB[..., ::-1], np.full(RGB.shape[:2], 7, np.uint8)]), RGB),
        ("mono8", RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=2)),
    ],
)
def test_8bit_encodings(encoding, pixels, expected, step):
    out = image_to_rgb(make_image(encoding, np.ascontiguousarray(pixels), step=step))
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_matches_cv_bridge_where_cv_bridge_is_right(encoding):
    """Dense little-endian 8-bit images: the same pixels as cv_bridge (an independent reference)."""
    cv_bridge = pytest.importorskip("cv_bridge")
    pixels = {"rgb8": RGB, "bgr8": RGB, "mono8": RGB[..., 0]}.get(encoding, np.dstack([RGB, RGB[..., 0]]))
    msg = make_image(encoding, np.ascontiguousarray(pixels))
    np.testing.assert_array_equal(image_to_rgb(msg), cv_bridge.CvBridge().imgmsg_to_cv2(msg, "rgb8"))


@pytest.mark.parametrize(
    "encoding,pixels,expected",
    [
        ("rgb8", RGB, RGB),
        ("bgr8", RGB[..., ::-1], RGB),
        ("mono8", RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=2)),
        ("8UC3", RGB[..., ::-1], RGB),  # OpenCV's type: BGR
        ("8UC1", RGB[..., 0], np.repeat(RGB[..., :1], 3, axis=2)),
    ],
)
def test_big_endian_flag_does_not_matter_for_8_bit(encoding, pixels, expected):
    """is_bigendian: 1 on 8-bit images (cv_bridge under NumPy 2 raises on it) converts as usual."""
    out = image_to_rgb(make_image(encoding, np.ascontiguousarray(pixels), bigendian=True))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("step", [None, 20])
def test_mono16_scales_full_range_to_8_bit(encoding, bigendian, step):
    values = np.array([[0, 257, 32896, 65535], [128, 255, 65280, 1000]], np.uint16)
    pixels = values.astype(">u2" if bigendian else "<u2")
    out = image_to_rgb(make_image(encoding, pixels, step=step, bigendian=bigendian))
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("encoding", ["uyvy", "yuv422", "yuyv", "yuv422_yuy2"])
@pytest.mark.parametrize("step", [None, 40])
def test_yuv422_encodings(encoding, step):
    packed = np.empty((H, W // 2, 4), np.uint8)
    if encoding in ("uyvy", "yuv422"):
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = U, Y[:, 0::2], V, Y[:, 1::2]
    else:
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = Y[:, 0::2], U, Y[:, 1::2], V
    out = image_to_rgb(make_image(encoding, packed.reshape(H, W, 2), step=step))
    expected = yuv_to_rgb_bt601(Y, np.repeat(U, 2, axis=1), np.repeat(V, 2, axis=1))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert np.abs(out - expected).max() <= 2


@pytest.mark.parametrize("encoding", ["nv12", "nv21"])
def test_yuv420_semi_planar(encoding):
    u, v = U[0::2], V[0::2]  # one chroma pair per 2x2 block
    uv = np.stack([u, v] if encoding == "nv12" else [v, u], -1).reshape(H // 2, W)
    out = image_to_rgb(make_image(encoding, np.vstack([Y, uv]), height=H, width=W))
    full = lambda c: np.repeat(np.repeat(c, 2, axis=0), 2, axis=1)  # noqa: E731
    expected = yuv_to_rgb_bt601(Y, full(u), full(v))
    assert out.shape == (H, W, 3)
    assert np.abs(out - expected).max() <= 2


@pytest.mark.parametrize(
    "fmt,ext,tolerance",
    [("jpeg", ".jpg", 40), ("png", ".png", 0), ("rgb8; jpeg compressed bgr8", ".jpg", 40)],
)
def test_compressed(fmt, ext, tolerance):
    rgb = smooth_rgb()
    msg = CompressedImage(format=fmt)
    msg.data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    out = compressed_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= tolerance


def test_compressed_grayscale_png_becomes_rgb():
    gray = smooth_rgb()[..., 0]
    msg = CompressedImage(format="png")
    msg.data = cv2.imencode(".png", gray)[1].tobytes()
    out = compressed_to_rgb(msg)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", bytes(100)])
def test_corrupt_compressed_is_malformed(data):
    msg = CompressedImage(format="jpeg")
    msg.data = data
    with pytest.raises(MalformedImage):
        compressed_to_rgb(msg)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_jpeg_is_malformed(keep):
    """A JPEG cut in its header or its scan is refused as malformed (OpenCV's decoder fails on a
    truncated stream), never returned as a half-grey frame."""
    full = cv2.imencode(".jpg", smooth_rgb())[1].tobytes()
    msg = CompressedImage(format="jpeg")
    msg.data = full[: int(len(full) * keep)]
    with pytest.raises(MalformedImage, match="does not decode"):
        compressed_to_rgb(msg)


@pytest.mark.parametrize("encoding", ["32FC1", "8SC1", "rgb16", "foo"])
def test_unsupported_encodings(encoding):
    msg = Image(encoding=encoding, height=2, width=2, step=8)
    msg.data = bytes(16)
    with pytest.raises(UnsupportedEncoding, match=encoding):
        image_to_rgb(msg)


@pytest.mark.parametrize(
    "height,width,step,size,match",
    [
        (0, 0, 0, 0, "empty"),
        (4, 0, 0, 0, "empty"),
        (4, 4, 12, 47, "step\\*height"),  # one byte short
        (4, 4, 12, 0, "step\\*height"),
        (4, 4, 8, 48, "step 8 is smaller"),
    ],
)
def test_malformed_raw_images(height, width, step, size, match):
    msg = Image(encoding="rgb8", height=height, width=width, step=step)
    msg.data = bytes(size)
    with pytest.raises(MalformedImage, match=match):
        image_to_rgb(msg)


@pytest.mark.parametrize("encoding", ["uyvy", "nv12"])
def test_odd_width_chroma_subsampled_is_malformed(encoding):
    msg = Image(encoding=encoding, height=4, width=5, step=10)
    msg.data = bytes(100)
    with pytest.raises(MalformedImage, match="odd"):
        image_to_rgb(msg)


def test_longer_data_than_needed_is_accepted():
    msg = make_image("rgb8", RGB)
    msg.data = bytes(msg.data) + bytes(10)
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


COLOUR = (200, 90, 30)  # R, G, B


def bayer_mosaic(pattern, h=8, w=8, dtype=np.uint8, scale=1):
    """A solid-colour image as a Bayer sensor of `pattern` (first row's two, second row's two) sees it."""
    value = dict(zip("rgb", COLOUR, strict=True))
    cell = np.array([[value[pattern[0]], value[pattern[1]]], [value[pattern[2]], value[pattern[3]]]])
    return (np.tile(cell, (h // 2, w // 2)) * scale).astype(dtype)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_patterns_demosaic_to_the_right_colours(pattern, bits):
    if bits == 8:
        mosaic = bayer_mosaic(pattern)
    else:
        mosaic = bayer_mosaic(pattern, dtype=np.uint16, scale=257).astype(">u2")
    out = image_to_rgb(make_image(f"bayer_{pattern}{bits}", mosaic, bigendian=bits == 16))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to(COLOUR, (4, 4, 3)))


def png_header(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_png_declaring_a_huge_image_is_refused_before_decoding():
    """69 bytes declaring 40000x40000: refused from the header (decoding would need 4.8 GB)."""
    msg = CompressedImage(format="png")
    msg.data = png_header(40000, 40000) + bytes(36)
    with pytest.raises(MalformedImage, match="40000x40000 is over the size limit"):
        compressed_to_rgb(msg)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_real_images_over_the_limit_are_refused_by_their_header(ext):
    msg = CompressedImage(format=ext[1:])
    msg.data = cv2.imencode(ext, np.zeros((30, 40, 3), np.uint8))[1].tobytes()
    with pytest.raises(MalformedImage, match="40x30 is over the size limit of 1000 pixels"):
        compressed_to_rgb(msg, max_pixels=1000)
    assert compressed_to_rgb(msg, max_pixels=1200).shape == (30, 40, 3)


def test_jpeg_size_is_read_past_other_segments():
    """EXIF/APP segments and fill bytes before the frame header; progressive JPEG (SOF2)."""
    jpeg = cv2.imencode(".jpg", np.zeros((17, 23, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[
        1
    ].tobytes()
    app1 = b"\xff\xe1" + struct.pack(">H", 10) + b"Exif\x00\x00\x00\x00"
    data = jpeg[:2] + b"\xff" + app1 + jpeg[2:]
    assert ros_image.compressed_size(np.frombuffer(data, np.uint8)) == (23, 17)
    msg = CompressedImage(format="jpeg")
    msg.data = data
    assert compressed_to_rgb(msg).shape == (17, 23, 3)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"GIF89a" + bytes(30), "neither JPEG nor PNG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(8), "IHDR"),
        (b"\xff\xd8\xff\xda" + bytes(40), "without a frame header"),
        (b"\xff\xd8\xff\xe0\x00\x01" + bytes(40), "segment length"),
        (b"\xff\xd8" + bytes(40), "marker expected"),
        (png_header(4, 4) + bytes(20), "does not decode"),
    ],
)
def test_broken_compressed_headers_are_malformed(data, match):
    msg = CompressedImage(format="png")
    msg.data = data
    with pytest.raises(MalformedImage, match=match):
        compressed_to_rgb(msg)


def test_raw_images_over_the_limit_are_refused():
    with pytest.raises(MalformedImage, match="over the size limit"):
        image_to_rgb(make_image("rgb8", RGB), max_pixels=47)


def with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) rewritten to declare width x height."""
    data, i = bytearray(jpeg), 2
    while data[i + 1] not in (0xC0, 0xC2):
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_tiny_jpeg_declaring_8000x8000_is_refused_without_a_huge_decode():
    """Issue 24 item 14: ~900 bytes declaring 8000x8000 (under max_image_pixels) were decoded in full
    (seconds of CPU, +430 MiB) into a grey 8000x8000 frame. Decoded at the model's scale, the
    missing data is a decoder warning: refused as malformed."""
    small = cv2.imencode(".jpg", RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))[1].tobytes()
    msg = CompressedImage(format="jpeg")
    msg.data = with_declared_size(small, 8000, 8000)
    for target in (None, lambda h, w: (448, 448)):
        with pytest.raises(MalformedImage, match="premature end of data"):
            compressed_to_rgb(msg, target=target)


def test_a_jpeg_missing_data_before_its_end_marker_is_refused():
    """Cut in its scan, then closed with an end-of-image marker: OpenCV returned it with the missing
    part grey; libjpeg's warning now refuses it."""
    full = cv2.imencode(".jpg", cv2.resize(smooth_rgb(), (640, 480)))[1].tobytes()
    msg = CompressedImage(format="jpeg")
    msg.data = full[: len(full) // 2] + b"\xff\xd9"
    with pytest.raises(MalformedImage, match="does not decode: Corrupt JPEG data"):
        compressed_to_rgb(msg)


def test_a_large_jpeg_is_decoded_at_the_scale_the_model_needs():
    """DCT scaling (libjpeg-turbo's n/8) to the smallest size still at least the target on both
    sides; no target: full size. The reduced picture is the image, not a crop."""
    rgb = cv2.resize(smooth_rgb(), (1600, 1200))
    msg = CompressedImage(format="jpeg")
    msg.data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    assert compressed_to_rgb(msg).shape == (1200, 1600, 3)
    for target in [(336, 448), (140, 196), (150, 200), (1200, 1600)]:
        out = compressed_to_rgb(msg, target=lambda h, w, t=target: t)
        assert target[0] <= out.shape[0] < target[0] + 150 and target[1] <= out.shape[1] < target[1] + 200
        assert out.shape[0] * 4 == out.shape[1] * 3, out.shape  # 1/8 steps keep 4:3 exactly
        expected = cv2.resize(rgb, out.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(out.astype(int) - expected).mean() < 3


def test_a_png_too_short_for_its_declared_size_is_refused_unread():
    """Deflate packs at most ~1032 bytes into one: 8000x8000 RGB needs at least ~186 kB of data."""
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    msg = CompressedImage(format="png")
    msg.data = png_header(8000, 8000) + png[33:]
    with pytest.raises(MalformedImage, match=r"declares a 8000x8000 PNG in \d+ bytes; a complete one needs"):
        compressed_to_rgb(msg)
    big = cv2.imencode(".png", np.zeros((2000, 2000, 3), np.uint8))[1].tobytes()  # real, highly compressed
    msg.data = big
    assert len(big) < 2000 * 2000 * 3 / 500 and compressed_to_rgb(msg).shape == (2000, 2000, 3)


def test_long_encoding_and_format_strings_are_cut_in_errors():
    """Issue 24 item 14b: a 50,000-character encoding was logged in full with every error."""
    with pytest.raises(UnsupportedEncoding) as raised:
        image_to_rgb(make_image("x" * 50000, RGB))
    assert len(str(raised.value)) < 600 and "(50000 characters)" in str(raised.value)
    msg = CompressedImage(format="f" * 50000)
    msg.data = b"\x00garbage"
    with pytest.raises(MalformedImage) as raised:
        compressed_to_rgb(msg)
    assert len(str(raised.value)) < 300 and "(50000 characters)" in str(raised.value)
