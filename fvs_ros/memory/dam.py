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

The choice itself runs on the host: it is sequential, over a small [D, M] matrix.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

TIE_RTOL = 1e-3
TIE_NOISE = 1e-5


def choosing_order(weight: Tensor, time: Tensor) -> Tensor:
    """Cluster indices, heaviest first, ties -> the more recent (dead clusters, weight 0, last)."""
    by_time = time.argsort(descending=True, stable=True)
    return by_time[weight[by_time].argsort(descending=True, stable=True)]


def pick_frames(sq_dist: np.ndarray, scale: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Rows of the retained frames that DAM uses, ordered by slot index.

    sq_dist [n, M]: squared low-res distances from the choosing centroids, in choosing order, to
    the M >= n retained frames; scale [n, M]: |c|^2 + |f|^2 of each pair; slot [M]: the frames'
    slot indices.
    """
    taken = np.zeros(sq_dist.shape[1], dtype=bool)
    rows = []
    for d, noise in zip(sq_dist, TIE_NOISE * scale):
        d = np.where(taken, np.inf, d)
        near = d <= d.min() * (1 + TIE_RTOL) + noise
        row = int(np.argmax(np.where(near, slot, -1)))
        taken[row] = True
        rows.append(row)
    return np.array(sorted(rows, key=lambda r: slot[r]), dtype=np.int64)
