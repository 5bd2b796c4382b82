"""Where the memory came from: centroid spans, each centroid's nearest retained frame and the
retained slots, as the snapshot reports them (answer evidence and the memory view read them)."""

import torch

from fvs_ros.memory import FlashMemory, MemoryConfig

CFG = MemoryConfig(csm_slots=6, dam_frames=3, bank_capacity=12)


def stream(n: int, seed: int = 0, scenes: int = 4):
    """Scenes revisited in runs of 5 frames, with noise; stamps one second apart from 50 s."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(scenes, 4, 8, generator=g)
    which = torch.randint(0, scenes, (n // 5 + 1,), generator=g).repeat_interleave(5)[:n]
    low = centers[which] + 0.3 * torch.randn(n, 4, 8, generator=g)
    full = torch.randn(n, 16, 8, generator=g)
    return low, full, 50.0 + torch.arange(n, dtype=torch.float64)


def test_spans_hold_the_members():
    low, full, stamps = stream(80)
    mem = FlashMemory(CFG)
    for i in range(0, 80, 3):
        snap = mem.update(low[i : i + 3], full[i : i + 3], stamps[i : i + 3])
        first, last = snap.csm_spans[:, 0], snap.csm_spans[:, 1]
        assert snap.csm_spans.shape == (len(snap.csm_weights), 2)
        assert torch.all(first <= snap.csm_stamps + 1e-9) and torch.all(snap.csm_stamps <= last + 1e-9)
        # w distinct member frames one second apart span at least w - 1 seconds
        assert torch.all(last - first >= snap.csm_weights.double() - 1 - 1e-9)
        assert float(first.min()) == snap.first_stamp and float(last.max()) == snap.last_stamp
        assert set(first.tolist()) | set(last.tolist()) <= set(stamps[: i + 3].tolist())


def test_one_frame_centroids_span_their_frame():
    low, full, stamps = stream(5)
    snap = FlashMemory(CFG).update(low, full, stamps)
    assert torch.equal(snap.csm_spans, torch.stack([stamps, stamps], 1))
    assert torch.equal(snap.csm_nearest_slots, torch.arange(5)) and torch.equal(
        snap.csm_nearest_stamps, stamps
    )


def test_nearest_retained_frame_from_the_features():
    low, full, stamps = stream(60, seed=3)
    mem = FlashMemory(CFG)
    mem.update(low[:30], full[:30], stamps[:30])
    snap = mem.update(low[30:], full[30:], stamps[30:])
    held = snap.bank_slots
    assert len(held) == CFG.bank_capacity and torch.all(held[1:] > held[:-1])
    assert set(snap.dam_slots.tolist()) <= set(held.tolist())
    centroids = snap.csm_features.reshape(len(snap.csm_weights), -1).double()
    frames = low[held].reshape(len(held), -1).double()
    dist = torch.cdist(centroids, frames)
    near = dist <= dist.min(1, keepdim=True).values * (1 + 1e-6)  # ties: the latest frame (as DAM)
    nearest = held[torch.where(near, held[None, :], -1).argmax(1)]
    assert torch.equal(snap.csm_nearest_slots, nearest)
    assert torch.equal(snap.csm_nearest_stamps, stamps[nearest])
    assert near.sum() > len(near)  # the stream has a tie (a two-frame cluster's midpoint)


def test_spans_survive_save_and_load(tmp_path):
    low, full, stamps = stream(40, seed=5)
    mem = FlashMemory(CFG)
    mem.update(low, full, stamps)
    mem.save(tmp_path / "m.pt")
    loaded = FlashMemory.load(tmp_path / "m.pt").snapshot()
    assert torch.equal(loaded.csm_spans, mem.snapshot().csm_spans)
    assert torch.equal(loaded.bank_slots, mem.snapshot().bank_slots)
