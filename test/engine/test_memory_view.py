"""The memory view (fvs_ros/engine/memory_view.py), thumbnails (fvs_ros/engine/thumbnails.py) and evidence
items (fvs_ros/engine/grounding.py) on a real Flash Memory."""

import cv2
import numpy as np
import pytest
import torch

from fvs_ros.engine.grounding import CONTEXT, DETAIL, evidence_items
from fvs_ros.engine.memory_view import render_memory_view
from fvs_ros.engine.thumbnails import ThumbnailStore, encode_jpeg, thumbnail
from fvs_ros.memory import FlashMemory, MemoryConfig

CFG = MemoryConfig(csm_slots=6, dam_frames=4, bank_capacity=10)


def color(slot: int) -> tuple[int, int, int]:
    """A distinct solid colour per slot."""
    return (40 + (slot * 37) % 200, 40 + (slot * 91) % 200, 40 + (slot * 53) % 200)


@pytest.fixture(scope="module")
def fed():
    """40 frames of a few scenes into a real memory, with a thumbnail store pruned as the engine does."""
    g = torch.Generator().manual_seed(1)
    centers = 3 * torch.randn(4, 4, 8, generator=g)
    which = torch.randint(0, 4, (8,), generator=g).repeat_interleave(5)
    low = centers[which] + 0.3 * torch.randn(40, 4, 8, generator=g)
    full = torch.randn(40, 16, 8, generator=g)
    stamps = 1000.0 + 0.5 * torch.arange(40, dtype=torch.float64)
    mem, store = FlashMemory(CFG), ThumbnailStore(side=32)
    for i in range(0, 40, 4):
        snap = mem.update(low[i : i + 4], full[i : i + 4], stamps[i : i + 4])
        for slot in range(i, i + 4):
            store.add(slot, thumbnail(np.full((90, 160, 3), color(slot), np.uint8), store.side))
        store.retain(snap.bank_slots.tolist())
    return snap, store, stamps


def test_store_keeps_exactly_the_retained_frames(fed):
    snap, store, _ = fed
    assert len(store) == CFG.bank_capacity
    assert set(store.take(range(40))) == set(snap.bank_slots.tolist())
    assert store.nbytes == CFG.bank_capacity * 18 * 32 * 3  # 160x90 -> 32x18
    assert store.get(snap.dam_slots[0]).shape == (18, 32, 3)


def test_view_tiles_are_the_detail_frames_in_time_order(fed):
    snap, store, _ = fed
    view = render_memory_view(snap, store.take(snap.bank_slots.tolist()), columns=3, tile_width=64)
    assert view.image.dtype == np.uint8 and view.image.ndim == 3 and view.image.shape[2] == 3
    assert sorted(t.slot for t in view.tiles) == sorted(snap.dam_slots.tolist())
    assert [t.stamp for t in view.tiles] == sorted(t.stamp for t in view.tiles)
    for tile in view.tiles:
        assert tile.label.startswith(f"{tile.stamp:.2f} s")
        assert tile.stamp == float(snap.dam_stamps[snap.dam_slots.tolist().index(tile.slot)])
        x, y, w, h = tile.box
        assert np.all(view.image[y + h // 2, x + w // 2] == color(tile.slot))  # the tile shows its frame
    x, y, w, h = view.timeline_box
    timeline = view.image[y : y + h, x : x + w]
    assert np.any(np.all(timeline == (255, 170, 60), axis=-1))  # centroid bars are drawn
    ok, png = cv2.imencode(".png", view.image)
    assert ok and cv2.imdecode(png, cv2.IMREAD_COLOR).shape == view.image.shape


def test_view_of_an_empty_memory_and_of_missing_thumbnails(fed):
    empty = render_memory_view(FlashMemory(CFG).snapshot(), {})
    assert empty.tiles == () and empty.image.shape[0] > 0
    snap, _, _ = fed
    view = render_memory_view(snap, {})
    x, y, w, h = view.tiles[0].box
    assert np.all(view.image[y + h // 2, x + w // 2] == (70, 70, 70))


def test_evidence_items_name_the_heaviest_blocks(fed):
    snap, store, stamps = fed
    dam, csm = len(snap.dam_slots), len(snap.csm_weights)
    shares = np.full(dam + csm, 0.01)
    shares[1], shares[dam + 2] = 0.5, 0.3  # DAM frame 1, then centroid 2
    items = evidence_items(shares / shares.sum(), snap, 3, store)
    assert len(items) == 3 and items[0].share > items[1].share >= items[2].share
    first, second = items[0], items[1]
    assert first.kind == DETAIL and first.slot == int(snap.dam_slots[1])
    assert first.stamp == float(stamps[first.slot]) and first.span == (first.stamp, first.stamp)
    assert second.kind == CONTEXT and second.slot == int(snap.csm_nearest_slots[2])
    assert second.stamp == float(stamps[second.slot]) and second.weight == int(snap.csm_weights[2])
    assert second.span == tuple(float(v) for v in snap.csm_spans[2])
    assert np.all(first.image == color(first.slot))
    assert evidence_items(shares, snap, 0) == ()
    with pytest.raises(ValueError):
        evidence_items(shares[:-1], snap, 3)


def test_jpeg_of_a_thumbnail_decodes():
    rgb = np.zeros((18, 32, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(rgb), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == rgb.shape and abs(int(decoded[9, 16, 2]) - 200) < 8  # BGR: red last
