"""Flash Memory (fvs_ros.memory): invariants, determinism, batches, save/load, bad input, events."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fvs_ros.common.cuda_graph import CaptureError
from fvs_ros.memory import (
    FORMAT_VERSION,
    FlashMemory,
    MemoryConfig,
    MemoryFileError,
    MemorySnapshot,
    csm,
    dam,
    graph,
)
from fvs_ros.memory import memory as memory_module

SMALL = MemoryConfig(csm_slots=8, dam_frames=4, bank_capacity=12)
REFERENCE = Path(__file__).parents[1] / "data" / "official_reference" / "offline_reference.npz"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The memory's CPU ops are tiny: intra-op threads only add overhead (and noise on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene_stream(seed: int, n: int, nl: int = 4, nf: int = 16, c: int = 8, scenes: int = 5):
    """Frames drawn from a few scenes with slow drift and noise: low [n, nl, c], full [n, nf, c], stamps
    [n]."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(scenes, nl, c, generator=g)
    which = torch.randint(0, scenes, (n // 10 + 1,), generator=g).repeat_interleave(10)[:n]
    drift = 0.05 * torch.randn(n, nl, c, generator=g).cumsum(0)
    low = centers[which] + drift + 0.3 * torch.randn(n, nl, c, generator=g)
    full = torch.randn(n, nf, c, generator=g)
    stamps = 100.0 + torch.rand(n, generator=g).cumsum(0).double()
    return low, full, stamps


def feed(mem: FlashMemory, low, full, stamps, batch_sizes) -> list[MemorySnapshot]:
    snaps, i = [], 0
    for b in batch_sizes:
        if i >= len(low):
            break
        snaps.append(mem.update(low[i : i + b], full[i : i + b], stamps[i : i + b]))
        i += b
    return snaps


def random_batches(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 8, size=n).tolist()


def assert_same_snapshot(a: MemorySnapshot, b: MemorySnapshot):
    for f in dataclasses.fields(MemorySnapshot):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif f.name != "version":
            assert x == y, f.name


def check_invariants(mem: FlashMemory, snap: MemorySnapshot, full, stamps, cfg: MemoryConfig):
    n = snap.frames_seen
    k = len(snap.csm_weights)
    assert 1 <= k <= cfg.csm_slots
    assert snap.csm_features.shape[0] == k and snap.csm_features.dtype == torch.float32
    assert int(snap.csm_weights.sum()) == n and bool((snap.csm_weights >= 1).all())
    times = snap.csm_times
    assert bool((times[1:] >= times[:-1]).all())
    assert float(times.min()) >= 0 and float(times.max()) <= n - 1
    assert float(snap.csm_stamps.min()) >= float(stamps[0]) - 1e-9
    assert float(snap.csm_stamps.max()) <= float(stamps[n - 1]) + 1e-9
    slots = snap.dam_slots.tolist()
    assert len(slots) == min(cfg.dam_frames, k)
    assert len(set(slots)) == len(slots)  # distinct
    if cfg.dam_order == "time" or n <= cfg.dam_frames:
        assert slots == sorted(slots)
    retained = set(mem._bank.slot[: mem._bank.count].tolist())
    assert set(slots) <= retained
    assert torch.equal(snap.dam_features, full[slots])  # DAM hands over exactly those frames' features
    torch.testing.assert_close(snap.dam_stamps, stamps[slots].double(), rtol=0, atol=1e-9)
    if cfg.bank_capacity is not None:
        assert mem._bank.count == min(n, cfg.bank_capacity)
    assert snap.first_stamp == float(stamps[0]) and snap.last_stamp == float(stamps[n - 1])


@pytest.mark.parametrize(
    "cfg", [SMALL, MemoryConfig(csm_slots=6, dam_frames=6, bank_capacity=None)], ids=["bounded", "unbounded"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_on_random_streams(seed, cfg):
    low, full, stamps = scene_stream(seed, 120)
    mem = FlashMemory(cfg)
    versions, i = [], 0
    for b in random_batches(seed, 120):
        snap = mem.update(low[i : i + b], full[i : i + b], stamps[i : i + b])
        check_invariants(mem, snap, full, stamps, cfg)
        versions.append(snap.version)
        i += b
        if i >= len(low):
            break
    assert versions == sorted(set(versions))


def test_fewer_frames_than_slots_keep_one_centroid_each():
    low, full, stamps = scene_stream(3, 6)
    snap = FlashMemory(MemoryConfig(csm_slots=8, dam_frames=10)).update(low, full, stamps)
    assert snap.csm_weights.tolist() == [1] * 6
    assert snap.csm_times.tolist() == list(range(6))
    torch.testing.assert_close(snap.csm_features, low)
    assert snap.dam_slots.tolist() == list(range(6))


def test_well_separated_offline_case_matches_official_reference():
    """Like the checkpoint's reference run: 8 slots of 4 scenes (4/2/1/1) into 4 centroids and 2
    DAM frames, in one update -> weights [4,2,1,1], times [1.5,4.5,6,7], DAM slots [0,5]. The
    two-slot scene is an exact tie (its centroid is their midpoint): the later slot wins."""
    g = torch.Generator().manual_seed(0)
    scenes = 10 * torch.randn(4, 6, 5, generator=g)
    low = scenes[[0, 0, 0, 0, 1, 1, 2, 3]] + 0.1 * torch.randn(8, 6, 5, generator=g)
    low[0] = scenes[0] + 0.01 * (low[1:4] - scenes[0]).mean(0)  # slot 0: nearest to its scene's mean
    full = torch.randn(8, 24, 5, generator=g)
    snap = FlashMemory(MemoryConfig(csm_slots=4, dam_frames=2)).update(low, full, torch.arange(8.0))
    assert snap.csm_weights.tolist() == [4, 2, 1, 1]
    assert snap.csm_times.tolist() == [1.5, 4.5, 6.0, 7.0]
    assert snap.dam_slots.tolist() == [0, 5]
    torch.testing.assert_close(snap.csm_features[0], low[:4].mean(0))
    assert torch.equal(snap.dam_features, full[[0, 5]])


@pytest.mark.skipif(not REFERENCE.exists(), reason="official reference data not present")
def test_reference_frames_cluster_like_the_official_run():
    """The reference run's raw pixel patches (a stand-in for ViT features) give its clusters."""
    ref = np.load(REFERENCE)
    slots = torch.from_numpy(ref["pixel_values"]).reshape(8, 128, 1176)
    mem = FlashMemory(
        MemoryConfig(csm_slots=4, dam_frames=2)
    )  # the checkpoint's temporal/spatial lengths 8/4, halved
    snap = mem.update(slots[:, :32], slots, torch.arange(8.0))
    np.testing.assert_array_equal(snap.csm_weights.numpy(), ref["csm_weights"])
    np.testing.assert_array_equal(snap.csm_times.numpy(), ref["csm_timestamps"])


def test_carried_dot_products_match_the_features():
    """The Gram matrix of the centroids and their dot products with the held frames are carried
    across updates (no pass over the features); they must agree with a fresh computation."""
    low, full, stamps = scene_stream(13, 600)
    mem = FlashMemory(MemoryConfig(csm_slots=20, dam_frames=10, bank_capacity=40))
    mem.update(low, full, stamps)
    centers, bank = mem._clusters.centers.double(), mem._bank
    scale = float(centers.square().sum(1).max())
    torch.testing.assert_close(mem._clusters.gram, centers @ centers.T, rtol=0, atol=1e-5 * scale)
    held = bank.low[: bank.count].double()
    torch.testing.assert_close(bank.cross[:, : bank.count], centers @ held.T, rtol=0, atol=1e-5 * scale)


def test_same_config_same_stream_same_memory():
    low, full, stamps = scene_stream(4, 120)
    a, b = FlashMemory(SMALL), FlashMemory(SMALL)
    for sa, sb in zip(
        feed(a, low, full, stamps, [5] * 24), feed(b, low, full, stamps, [5] * 24), strict=True
    ):
        assert_same_snapshot(sa, sb)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_update_equals_frame_by_frame(seed):
    low, full, stamps = scene_stream(seed, 100)
    one = FlashMemory(SMALL)
    feed(one, low, full, stamps, [1] * 100)
    batched = FlashMemory(SMALL)
    feed(batched, low, full, stamps, random_batches(seed + 10, 100))
    assert_same_snapshot(one.snapshot(), batched.snapshot())
    whole = FlashMemory(SMALL)
    whole.update(low, full, stamps)
    assert_same_snapshot(one.snapshot(), whole.snapshot())


def test_held_snapshot_never_changes():
    low, full, stamps = scene_stream(5, 80)
    mem = FlashMemory(SMALL)
    held = mem.update(low[:40], full[:40], stamps[:40])
    copy = {
        f.name: getattr(held, f.name).clone()
        for f in dataclasses.fields(held)
        if isinstance(getattr(held, f.name), torch.Tensor)
    }
    feed(mem, low[40:], full[40:], stamps[40:], [1] * 40)
    assert mem.snapshot() is not held and mem.snapshot().version > held.version
    for name, t in copy.items():
        assert torch.equal(getattr(held, name), t), name


def test_bounded_memory_bytes_stay_flat_unbounded_grow():
    low, full, stamps = scene_stream(6, 200)
    bounded, unbounded = FlashMemory(SMALL), FlashMemory(dataclasses.replace(SMALL, bank_capacity=None))
    sizes = {"b": [], "u": []}
    for i in range(0, 200, 20):
        for mem, key in ((bounded, "b"), (unbounded, "u")):
            mem.update(low[i : i + 20], full[i : i + 20], stamps[i : i + 20])
            sizes[key].append(mem.nbytes())
    assert len(set(sizes["b"])) == 1
    assert (
        unbounded._bank.count == 200
        and sizes["u"] == sorted(sizes["u"])
        and sizes["u"][-1] > 3 * sizes["u"][0]
    )


def test_save_load_round_trip_and_identical_next_update(tmp_path):
    low, full, stamps = scene_stream(7, 90)
    mem = FlashMemory(SMALL)
    mem.update(low[:1], full[:1], stamps[:1], (4, 4))
    feed(mem, low[1:70], full[1:70], stamps[1:70], random_batches(7, 69))
    assert mem.snapshot().full_hw == (4, 4)
    path = tmp_path / "memory.pt"
    mem.save(path)
    loaded = FlashMemory.load(path)
    assert loaded.config == mem.config
    assert_same_snapshot(mem.snapshot(), loaded.snapshot())
    assert loaded.snapshot().version == mem.snapshot().version
    assert_same_snapshot(
        mem.update(low[70:], full[70:], stamps[70:]), loaded.update(low[70:], full[70:], stamps[70:])
    )


def test_save_load_empty_memory(tmp_path):
    FlashMemory(SMALL).save(tmp_path / "empty.pt")
    loaded = FlashMemory.load(tmp_path / "empty.pt")
    assert loaded.snapshot().frames_seen == 0 and loaded.snapshot().first_stamp is None
    low, full, stamps = scene_stream(8, 10)
    assert_same_snapshot(loaded.update(low, full, stamps), FlashMemory(SMALL).update(low, full, stamps))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(MemoryFileError, match="no memory file"):
        FlashMemory.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(MemoryFileError, match="not a readable memory file"):
        FlashMemory.load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MemoryFileError, match="not an fvs_ros memory file"):
        FlashMemory.load(tmp_path / "other.pt")

    low, full, stamps = scene_stream(9, 30)
    mem = FlashMemory(SMALL)
    mem.update(low, full, stamps)
    mem.save(tmp_path / "good.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(MemoryFileError, match=f"format version {FORMAT_VERSION + 1}"):
        FlashMemory.load(tmp_path / "future.pt")
    state["format_version"] = FORMAT_VERSION
    state["clusters"]["centers"] = state["clusters"]["centers"][:, :5]
    torch.save(state, tmp_path / "corrupt.pt")
    with pytest.raises(MemoryFileError, match="corrupt"):
        FlashMemory.load(tmp_path / "corrupt.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryFileError):
        FlashMemory.load(tmp_path / "truncated.pt")


def bad_inputs(low, full, stamps):
    nan_low, inf_full = low.clone(), full.clone()
    nan_low[1, 2, 3] = float("nan")
    inf_full[0, 0, 0] = float("inf")
    return {
        "low not 3-d": (low[0], full, stamps),
        "full not a tensor": (low, full.numpy(), stamps),
        "integer features": (low.long(), full, stamps),
        "empty batch": (low[:0], full[:0], stamps[:0]),
        "B mismatch": (low, full[:2], stamps),
        "C mismatch low/full": (low, full[..., :4], stamps),
        "Nl changed": (low[:, :3], full, stamps),
        "Nf changed": (low, full[:, :5], stamps),
        "C changed": (low[..., :4], full[..., :4], stamps),
        "NaN in low": (nan_low, full, stamps),
        "Inf in full": (low, inf_full, stamps),
        "NaN stamp": (low, full, torch.tensor([1e9, float("nan"), 1e9 + 2])),
        "too few stamps": (low, full, stamps[:2]),
        "stamps go back": (low, full, stamps - 1000.0),
        "stamps not sorted": (low, full, stamps.flip(0)),
        "full_hw not the full-res grid": (low, full, stamps, (4, 5)),
        "full_hw changed": (low, full, stamps, (2, 8)),
    }


@pytest.mark.parametrize("case", list(bad_inputs(*scene_stream(0, 3)).keys()))
def test_bad_input_raises_and_leaves_memory_unchanged(case):
    low, full, stamps = scene_stream(10, 23)
    mem = FlashMemory(SMALL)
    mem.update(low[:20], full[:20], stamps[:20], (4, 4))
    before, nbytes = mem.snapshot(), mem.nbytes()
    with pytest.raises(ValueError):
        mem.update(*bad_inputs(low[20:], full[20:], stamps[20:])[case])
    assert mem.snapshot() is before and mem.nbytes() == nbytes and mem.frames_seen == 20
    reference = FlashMemory(SMALL)
    reference.update(low[:20], full[:20], stamps[:20], (4, 4))
    assert_same_snapshot(
        mem.update(low[20:], full[20:], stamps[20:]), reference.update(low[20:], full[20:], stamps[20:])
    )


def test_config_validation():
    with pytest.raises(ValueError):
        MemoryConfig(csm_slots=0)
    with pytest.raises(ValueError):
        MemoryConfig(dam_frames=30, bank_capacity=10)


def test_reset_forgets_and_version_keeps_increasing():
    low, full, stamps = scene_stream(11, 30)
    mem = FlashMemory(SMALL)
    v = mem.update(low, full, stamps).version
    mem.reset()
    assert mem.snapshot().frames_seen == 0 and mem.snapshot().version > v
    mem.update(low[:3, :2], full[:3], stamps[:3] - 50)  # new shapes and an earlier clock are fine after reset
    assert mem.snapshot().frames_seen == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_event_keeps_a_centroid_and_dam_retrieves_it(seed):
    """600 frames of one drifting scene with a visually distinct 18-frame event (3%) in the middle."""
    g = torch.Generator().manual_seed(seed)
    n, start, length, nl, c = 600, 291, 18, 4, 16
    scene, event = torch.randn(nl, c, generator=g), torch.randn(nl, c, generator=g)
    low = (
        scene + 0.02 * torch.randn(n, nl, c, generator=g).cumsum(0) + 0.3 * torch.randn(n, nl, c, generator=g)
    )
    low[start : start + length] = event + 0.3 * torch.randn(length, nl, c, generator=g)
    full = torch.randn(n, 8, c, generator=g)
    mem = FlashMemory(MemoryConfig())
    for i in range(0, n, 50):
        snap = mem.update(low[i : i + 50], full[i : i + 50], torch.arange(i, i + 50) / 10.0)
    to_event = (snap.csm_features - event).flatten(1).norm(dim=1)
    to_scene = (snap.csm_features - low[[0, start - 1, start + length, n - 1]].mean(0)).flatten(1).norm(dim=1)
    event_centroids = to_event < to_scene
    assert bool(event_centroids.any()), "no centroid for the event"
    times = snap.csm_times[event_centroids]
    assert bool(((times >= start) & (times < start + length)).all())
    assert any(start <= s < start + length for s in snap.dam_slots.tolist()), "DAM has no event frame"


def pick_frames_row_by_row(sq_dist, scale, slot):
    """dam.pick_frames as first written: one centroid after the other (the reference)."""
    taken = np.zeros(sq_dist.shape[1], dtype=bool)
    rows = []
    for d, noise in zip(sq_dist, dam.TIE_NOISE * scale, strict=True):
        d = np.where(taken, np.inf, d)
        near = d <= d.min() * (1 + dam.TIE_RTOL) + noise
        row = int(np.argmax(np.where(near, slot, -1)))
        taken[row] = True
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def tie_prone_distances(rng, n: int, m: int, kind: int) -> np.ndarray:
    if kind == 0:  # no ties
        return rng.random((n, m))
    if kind == 1:  # exact ties: a few distinct values
        return rng.integers(0, 4, (n, m)).astype(np.float64)
    if kind == 2:  # near ties on both sides of the TIE_RTOL boundary
        steps = [0, 5e-4, dam.TIE_RTOL, dam.TIE_RTOL * (1 + 1e-9), 2e-3, 0.5]
        return (rng.random((n, 1)) + 0.5) * (1 + rng.choice(steps, (n, m)))
    d = np.round(rng.random((n, m)), 2)  # zeros and rounded values
    d[:, :3] = 0
    return d


def test_pick_frames_matches_the_row_by_row_rule():
    """Same picks as choosing centroid by centroid, on random inputs with exact and near ties, tie
    noise of every size (none, below and above the distance gaps) and few frames (many collisions)."""
    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 12))
        m = int(rng.integers(n, 3 * n + 2))
        d = tie_prone_distances(rng, n, m, trial % 4)
        scale = rng.choice([0.0, 1.0, 100.0, 1e4], (n, m)) * rng.random((n, m))
        slot = rng.permutation(5 * m)[:m] if trial % 3 else rng.integers(0, m // 2 + 1, m)  # also equal slots
        slot = slot.astype(np.float64)
        np.testing.assert_array_equal(dam.pick_frames(d, scale, slot), pick_frames_row_by_row(d, scale, slot))


def weight_order_stream(order_of_sizes=(1, 2, 4, 3)):
    """Scenes of these lengths in time order (well separated): low [n, 4, 8], full [n, 16, 8], stamps,
    and each slot's scene."""
    g = torch.Generator().manual_seed(5)
    centers = 10 * torch.randn(len(order_of_sizes), 4, 8, generator=g)
    which = torch.repeat_interleave(torch.arange(len(order_of_sizes)), torch.tensor(order_of_sizes))
    low = centers[which] + 0.1 * torch.randn(len(which), 4, 8, generator=g)
    return low, torch.randn(len(which), 16, 8, generator=g), torch.arange(float(len(which))).double(), which


@pytest.mark.parametrize("dam_order", ["weight", "time"])
def test_dam_frames_come_heaviest_cluster_first(dam_order):
    """Official order: weights [1, 2, 4, 3] (time order) -> DAM frames of the 4-, 3-, 2-slot scenes,
    in that order; "time" lists the same frames by slot."""
    low, full, stamps, scene_of = weight_order_stream()
    cfg = MemoryConfig(csm_slots=4, dam_frames=3, dam_order=dam_order)
    snap = FlashMemory(cfg).update(low, full, stamps)
    assert snap.csm_weights.tolist() == [1, 2, 4, 3]
    scenes = scene_of[snap.dam_slots].tolist()
    assert scenes == ([2, 3, 1] if dam_order == "weight" else [1, 2, 3])
    assert torch.equal(snap.dam_features, full[snap.dam_slots])


def test_equal_weights_fall_as_the_official_argsort_orders_them():
    """Ties: the official torch.argsort(weights, descending=True) on the CPU; stable (earlier
    centroid first) up to 16 centroids, torch's own order above (a stream of distinct slots, each
    its own centroid of weight 1, into a memory larger than the stream)."""
    for n in (10, 40):
        low, full, stamps = scene_stream(2, n)
        snap = FlashMemory(MemoryConfig(csm_slots=64, dam_frames=n - 1, bank_capacity=None)).update(
            low, full, stamps
        )
        want = torch.argsort(torch.ones(n), descending=True)[: n - 1]
        assert snap.dam_slots.tolist() == want.tolist()
        if n <= 16:
            assert want.tolist() == list(range(n - 1))
    few = FlashMemory(MemoryConfig(csm_slots=64, dam_frames=40)).update(low[:30], full[:30], stamps[:30])
    assert few.dam_slots.tolist() == list(range(30))  # at most dam_frames slots: all, in time order


def lloyd_from_a_poor_partition(seed: int, k: int = 8) -> csm.Absorption:
    """Absorption buffers holding k+1 random weighted points in the plane and a random partition
    of them into 3 clusters, which Lloyd moves (from the Ward merge's partition it would not: that
    is already a fixed point, up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(k + 1, 2, generator=g, dtype=torch.float64)
    ab = csm.Absorption.empty(k, 2, torch.device("cpu"))
    ab.gram.copy_(points @ points.T)
    ab.w.copy_(torch.randint(1, 5, (k + 1,), generator=g).double())
    a, mass = csm.memberships(torch.randint(0, 3, (k + 1,), generator=g), ab.w, ab.ids)
    ab.a.copy_(a)
    ab.mass.copy_(mass)
    return ab


def test_lloyd_iterations_split_anywhere_or_stopped_once_done_give_the_same_partition():
    """What the CUDA graphs rely on: iterations run in pieces equal them run at once, and
    iterations after convergence (or stopping once `done`) change nothing."""
    moved = 0
    for seed in range(40):
        tol = 1e-4 if seed % 2 else 1e9  # 1e9: done after the first iteration, which freezes a moving state
        whole, pieces, stopped = (lloyd_from_a_poor_partition(seed) for _ in range(3))
        start = whole.a.clone()
        csm.iterate(whole, 10, tol)
        for n in (1, 2, 7):
            csm.iterate(pieces, n, tol)
        csm.iterate(stopped, 10, tol, stop_early=bool)
        for ab in (pieces, stopped):
            assert (
                torch.equal(ab.a, whole.a)
                and torch.equal(ab.mass, whole.mass)
                and bool(ab.done) == bool(whole.done)
            )
        moved += not torch.equal(start, whole.a)
    assert moved >= 20  # the test exercises real iterations


class EagerGraph:
    """graph.StepGraph stand-in on the CPU: runs step when 'captured' (like the real warm-up) and
    on every replay, so the split step's logic runs without CUDA."""

    def __init__(self, step, device):
        step()
        self.replay = step


def graph_memory(cfg: MemoryConfig) -> FlashMemory:
    mem = FlashMemory(cfg)
    mem._use_graphs = (
        True  # the CPU has no CUDA graphs: with EagerGraph patched in, the split step runs eagerly
    )
    return mem


@pytest.mark.parametrize("iters, head_iters", [(10, 0), (10, 1), (10, 3), (10, 10), (1, 0), (1, 1)])
def test_split_step_gives_the_eager_memory_on_cpu(monkeypatch, head_iters, iters):
    """Head + tail replays while not converged + finish, as the CUDA graphs run them: identical to
    the eager step, whatever the head's share of the iterations."""
    monkeypatch.setattr(graph, "StepGraph", EagerGraph)
    monkeypatch.setattr(memory_module, "HEAD_ITERS", head_iters)
    cfg = dataclasses.replace(SMALL, kmeans_iters=iters)
    low, full, stamps = scene_stream(17, 150)
    split, eager = graph_memory(cfg), FlashMemory(cfg)
    batches = [1] * 50 + random_batches(17, 100)
    for a, b in zip(
        feed(split, low, full, stamps, batches), feed(eager, low, full, stamps, batches), strict=True
    ):
        assert_same_snapshot(a, b)
    assert split.graph_replays == 150 - cfg.bank_capacity - 1
    if head_iters == 0:  # the head only starts Lloyd: every frame needs the tail at least once
        assert split.graph_tail_replays >= split.graph_replays
    if head_iters >= iters:
        assert split.graph_tail_replays == 0


@pytest.mark.parametrize("stage", ["head", "tail", "finish"])
def test_split_step_capture_failure_absorbs_the_frame_once_on_cpu(monkeypatch, caplog, stage):
    """A capture that fails after its warm-up: the rest of the frame runs eagerly, one warning,
    and the memory stays eager with nothing lost or repeated."""
    captured = []

    class FailingGraph(EagerGraph):
        def __init__(self, step, device):
            super().__init__(step, device)
            captured.append(step)
            if len(captured) == ["head", "tail", "finish"].index(stage) + 1:
                raise CaptureError("not capturable")

    monkeypatch.setattr(graph, "StepGraph", FailingGraph)
    monkeypatch.setattr(memory_module, "HEAD_ITERS", 0)  # the capture frame needs the tail
    low, full, stamps = scene_stream(18, 60)
    mem, eager = graph_memory(SMALL), FlashMemory(SMALL)
    for a, b in zip(
        feed(mem, low, full, stamps, [1] * 60), feed(eager, low, full, stamps, [1] * 60), strict=True
    ):
        assert_same_snapshot(a, b)
    assert mem.graph_replays == 0 and mem._graphs is None
    assert [r.levelname for r in caplog.records if "capture failed" in r.getMessage()] == ["WARNING"]


@pytest.mark.cuda
def test_cuda_matches_cpu_on_a_clear_stream():
    low, full, stamps = scene_stream(12, 120, scenes=SMALL.csm_slots)
    low = 10 * low  # scenes far apart relative to the noise: no partition decided by rounding
    cpu, gpu = FlashMemory(SMALL), FlashMemory(SMALL, device="cuda")
    a = cpu.update(low, full, stamps)
    b = gpu.update(low.cuda(), full.cuda().half(), stamps)
    assert b.csm_features.is_cuda and b.dam_features.dtype == torch.float16
    assert torch.equal(a.csm_weights, b.csm_weights) and torch.equal(a.dam_slots, b.dam_slots)
    torch.testing.assert_close(a.csm_times, b.csm_times)
    torch.testing.assert_close(a.csm_features, b.csm_features.cpu(), rtol=1e-4, atol=1e-4)
    check_invariants(gpu, b, full.cuda().half(), stamps, SMALL)


def cuda_stream(seed: int, n: int):
    """scene_stream on CUDA, full-res features in float16."""
    low, full, stamps = scene_stream(seed, n, nl=16, nf=32, c=32)
    return low.cuda(), full.cuda().half(), stamps


@pytest.mark.cuda
@pytest.mark.parametrize("head_iters", [0, memory_module.HEAD_ITERS])
def test_cuda_graph_replays_give_the_eager_memory_bit_for_bit(monkeypatch, head_iters):
    """300 frames through a 12-frame bank: every frame after the bank filled (after the capture
    frame) is replayed from the graphs, in one-frame updates and in batches, with snapshots
    identical to the eager memory's. head_iters=0 makes every frame replay the tail graph."""
    monkeypatch.setattr(memory_module, "HEAD_ITERS", head_iters)
    low, full, stamps = cuda_stream(14, 300)
    graphed, eager = FlashMemory(SMALL, "cuda"), FlashMemory(SMALL, "cuda", cuda_graphs=False)
    batches = [1] * 100 + random_batches(14, 200)
    for a, b in zip(
        feed(graphed, low, full, stamps, batches), feed(eager, low, full, stamps, batches), strict=True
    ):
        assert_same_snapshot(a, b)
    assert graphed.graph_replays == 300 - SMALL.bank_capacity - 1 and eager.graph_replays == 0
    if head_iters == 0:
        assert graphed.graph_tail_replays >= graphed.graph_replays
    check_invariants(graphed, graphed.snapshot(), full, stamps, SMALL)


@pytest.mark.cuda
def test_cuda_graph_is_recaptured_after_reset_and_load(tmp_path):
    """reset() and load() drop the graph; the next frame that finds the bank full captures again."""
    low, full, stamps = cuda_stream(15, 200)
    mem, eager = FlashMemory(SMALL, "cuda"), FlashMemory(SMALL, "cuda", cuda_graphs=False)
    feed(mem, low[:50], full[:50], stamps[:50], [5] * 10)
    replays = mem.graph_replays
    assert replays > 0
    mem.reset()
    for a, b in zip(
        feed(mem, low, full, stamps, [1] * 100), feed(eager, low, full, stamps, [1] * 100), strict=True
    ):
        assert_same_snapshot(a, b)
    assert mem.graph_replays == replays + 100 - SMALL.bank_capacity - 1
    mem.save(tmp_path / "memory.pt")
    loaded = FlashMemory.load(tmp_path / "memory.pt", "cuda")
    rest = (low[100:], full[100:], stamps[100:], [4] * 25)
    for a, b, c in zip(feed(mem, *rest), feed(loaded, *rest), feed(eager, *rest), strict=True):
        assert_same_snapshot(a, c)
        assert_same_snapshot(b, c)
    assert loaded.graph_replays == 100 - 1


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
@pytest.mark.parametrize("stage", ["_start", "_finish"])  # the head graph's capture fails, or the last one's
def test_cuda_graph_capture_failure_falls_back_to_eager(monkeypatch, caplog, stage):
    """A capture that raises: one warning, and the memory stays eager without losing the frame."""
    step = getattr(FlashMemory, stage)

    def step_failing_in_capture(self, *args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        step(self, *args, **kwargs)

    monkeypatch.setattr(FlashMemory, stage, step_failing_in_capture)
    low, full, stamps = cuda_stream(16, 60)
    mem, eager = FlashMemory(SMALL, "cuda"), FlashMemory(SMALL, "cuda", cuda_graphs=False)
    for a, b in zip(
        feed(mem, low, full, stamps, [1] * 60), feed(eager, low, full, stamps, [1] * 60), strict=True
    ):
        assert_same_snapshot(a, b)
    assert mem.graph_replays == 0
    assert [r.levelname for r in caplog.records if "capture failed" in r.getMessage()] == ["WARNING"]
