"""FastVision (packed attention) gives the features of transformers' own ViT forward (CPU, float32;
its CUDA graphs and FlashAttention: test_video_lm_cuda.py, pytest -m cuda)."""

import numpy as np
import pytest
import torch

from fvs_ros.model import load_model
from fvs_ros.model.fast_vision import FastVision
from fvs_ros.model.preprocess import slot_patches
from fvs_ros.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "flash_vstream", seed=3)


def frames(n, h=112, w=168, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_features_equal_the_transformers_forward(ckpt):
    lm = load_model(ckpt, fast_vision=False)
    batch = torch.from_numpy(frames(3))
    ref = lm.vit(slot_patches(batch, 1))  # transformers' forward, SDPA per sequence
    fast = FastVision(lm.visual, graphs=False)
    full, low, full_hw, low_hw = fast.encode(batch)
    assert (full_hw, low_hw) == (ref.full_hw, ref.low_hw) == ((8, 12), (4, 6))
    torch.testing.assert_close(full, ref.full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low, ref.low, rtol=1e-5, atol=1e-5)


def test_two_frame_slots_equal_the_transformers_forward(ckpt):
    """The trained layout: one temporal patch of two different frames per slot."""
    lm = load_model(ckpt, fast_vision=False)
    batch = torch.from_numpy(frames(6, seed=4))
    ref = lm.vit(slot_patches(batch, 2))
    full, low, full_hw, _ = FastVision(lm.visual, graphs=False).encode(batch, frames_per_slot=2)
    assert full.shape[0] == low.shape[0] == 3 and full_hw == ref.full_hw
    torch.testing.assert_close(full, ref.full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low, ref.low, rtol=1e-5, atol=1e-5)
    one = FastVision(lm.visual, graphs=False).encode(batch[::2], frames_per_slot=1)[0]
    assert not torch.allclose(full, one, atol=1e-3)  # a pair is not its first frame twice
    with pytest.raises(ValueError, match="slots of 2"):
        FastVision(lm.visual, graphs=False).encode(batch[:3], frames_per_slot=2)


def test_extra_frames_in_a_batch_change_nothing(ckpt):
    """What lets a graph pad a batch up to its bucket: every slot's sequences attend only to themselves."""
    fast = FastVision(load_model(ckpt, fast_vision=False).visual, graphs=False)
    batch = torch.from_numpy(frames(4, seed=1))
    full3, low3, _, _ = fast.encode(batch[:3])
    full4, low4, _, _ = fast.encode(batch)
    torch.testing.assert_close(full4[:3], full3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low4[:3], low3, rtol=1e-5, atol=1e-5)


def test_video_lm_streams_frames_through_it(ckpt, tmp_path):
    lm = load_model(ckpt, fast_vision=True)
    assert lm.fast_vision is not None and not lm.fast_vision.graphs  # CPU: packed attention, no graphs
    feats = lm.encode_frames(frames(2, 100, 150))  # resized to the model's grid first
    ref = load_model(ckpt, fast_vision=False).encode_frames(frames(2, 100, 150))
    torch.testing.assert_close(feats.full, ref.full, rtol=1e-5, atol=1e-5)
    paired = lm.encode_frames(frames(2, 100, 150), frames_per_slot=2)  # a pair of frames: one slot
    eager = load_model(ckpt, fast_vision=False).encode_frames(frames(2, 100, 150), frames_per_slot=2)
    assert paired.full.shape[0] == 1
    torch.testing.assert_close(paired.full, eager.full, rtol=1e-5, atol=1e-5)
    assert (
        load_model(write_tiny_checkpoint(tmp_path / "q25", "qwen2_5_vl"), fast_vision=True).fast_vision
        is None
    )
