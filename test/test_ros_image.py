"""Image message -> RGB conversion for every supported encoding (pure functions, no DDS)."""

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from fvs_ros import ros_image
from fvs_ros.ros_image import MalformedImage, UnsupportedEncoding, compressed_to_rgb, image_to_rgb

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
def test_numpy_path_matches_cv_bridge(encoding, monkeypatch):
    """Dense 8-bit images go through cv_bridge; the numpy path must give the same pixels."""
    if ros_image._bridge is None:
        pytest.skip("cv_bridge is not importable here")
    pixels = {"rgb8": RGB, "bgr8": RGB, "mono8": RGB[..., 0]}.get(encoding, np.dstack([RGB, RGB[..., 0]]))
    msg = make_image(encoding, np.ascontiguousarray(pixels))
    bridged = image_to_rgb(msg)
    monkeypatch.setattr(ros_image, "_bridge", None)
    np.testing.assert_array_equal(image_to_rgb(msg), bridged)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("step", [None, 20])
def test_mono16_scales_full_range_to_8_bit(bigendian, step):
    values = np.array([[0, 257, 32896, 65535], [128, 255, 65280, 1000]], np.uint16)
    pixels = values.astype(">u2" if bigendian else "<u2")
    out = image_to_rgb(make_image("mono16", pixels, step=step, bigendian=bigendian))
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


def test_truncated_jpeg_is_malformed_or_decodes_partially():
    """A cut JPEG either fails cleanly or yields a full-size frame; it never raises anything else."""
    msg = CompressedImage(format="jpeg")
    msg.data = cv2.imencode(".jpg", RGB)[1].tobytes()[:60]
    try:
        assert compressed_to_rgb(msg).shape == RGB.shape
    except MalformedImage:
        pass


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1", "bayer_rggb8", "rgb16", "foo"])
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
