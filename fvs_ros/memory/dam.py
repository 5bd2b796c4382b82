"""Detail Augmentation Memory (DAM): which retained frames contribute full-resolution features.

The official 'klarge_retrieve': take the heaviest centroids; each one retrieves the frame whose
low-resolution features are nearest (Euclidean) to it. Differences here, all deliberate:
- no frame is taken twice: centroids choose in order of weight (heaviest first, ties -> the more
  recent centroid) and each takes its nearest frame not yet taken;
- near-ties go to the most recent frame. Exact ties are common (a two-frame cluster's centroid
  is equidistant from both frames) and rounding would otherwise decide them. A squared distance
  counts as tied with the nearest if it exceeds it by at most TIE_RTOL of it plus TIE_NOISE *
  (|c|^2 + |f|^2), the float32 rounding of the dot products the distance is made of (vectors are
  relative to the memory's reference frame). The official checkpoint's reference run resolves
  its one such tie (slots 4 and 5) to the later slot too;
- the result is ordered by slot index (the order the LLM sees DAM frames in).

The choice itself runs on the host, on a small [D, M] matrix. It is sequential (a centroid may
not take a frame an earlier one took), but picks rarely collide, so it is computed for a block of
centroids at once, and again from the first centroid whose choice an earlier pick could change.
"""

from __future__ import annotations

import numpy as np

TIE_RTOL = 1e-3
TIE_NOISE = 1e-5


def choosing_order(weight: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Cluster indices, heaviest first, ties -> the more recent, then the lower index (dead
    clusters, weight 0, last)."""
    by_time = np.argsort(-time, kind="stable")
    return by_time[np.argsort(-weight[by_time], kind="stable")]


def pick_frames(sq_dist: np.ndarray, scale: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Rows of the retained frames that DAM uses, ordered by slot index.

    sq_dist [n, M]: squared low-res distances from the choosing centroids, in choosing order, to
    the M >= n retained frames; scale [n, M]: |c|^2 + |f|^2 of each pair; slot [M]: the frames'
    slot indices. Centroid i takes, among the frames not taken by centroids 0..i-1,
    the most recent one near-tied with the nearest.
    """
    noise = TIE_NOISE * scale
    taken = np.zeros(sq_dist.shape[1], dtype=bool)
    rows: list[int] = []
    while len(rows) < len(sq_dist):
        first = len(rows)
        d = np.where(taken, np.inf, sq_dist[first:])
        near = d <= d.min(1, keepdims=True) * (1 + TIE_RTOL) + noise[first:]
        pick = np.argmax(np.where(near, slot, -1), axis=1)
        # a pick stands unless its centroid's near set holds an earlier pick of this block: taking
        # frames outside the near set changes neither the nearest distance nor the near set
        clash = np.tril(near[:, pick], -1).any(1)
        good = int(clash.argmax()) if clash.any() else len(pick)
        taken[pick[:good]] = True
        rows.extend(pick[:good].tolist())
    rows = np.array(rows, dtype=np.int64)
    return rows[np.argsort(slot[rows], kind="stable")]
