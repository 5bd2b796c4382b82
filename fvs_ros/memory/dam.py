"""Detail Augmentation Memory (DAM): which retained frames contribute full-resolution features, in
which order.

The official 'klarge_retrieve': sort the centroids (listed by time) with
`torch.argsort(weights, descending=True)`, take the first D, and let each retrieve the frame whose
low-resolution features are nearest (Euclidean) to it; the LLM sees the D frames in that order
(heaviest cluster first). While the stream has at most D slots, every slot, in time order.
- The order: `official_order` makes that very call (float32 weights on the CPU), so ties between
  equal weights fall as they fall in the official code run on the CPU: for up to 16 centroids
  torch's sort is stable (the earlier centroid first); above that torch's unstable sort decides,
  and the same torch build decides the same way. Positions travel with the tokens, but the causal
  mask sees the order, so the trained order is the default; MemoryConfig(dam_order="time") lists
  the same frames by slot index instead.
Differences, deliberate:
- no frame is taken twice: centroids choose in the official order and each takes its nearest
  frame not yet taken (the official code may hand the LLM one frame twice);
- near-ties go to the most recent frame. Exact ties are common (a two-frame cluster's centroid
  is equidistant from both frames) and rounding would otherwise decide them. A squared distance
  counts as tied with the nearest if it exceeds it by at most TIE_RTOL of it plus TIE_NOISE *
  (|c|^2 + |f|^2), the float32 rounding of the dot products the distance is made of (vectors are
  relative to the memory's reference frame). The official checkpoint's reference run resolves
  its one such tie (slots 4 and 5) to the later slot too.

The choice itself runs on the host, on a small [D, M] matrix. It is sequential (a centroid may
not take a frame an earlier one took), but picks rarely collide, so it is computed for a block of
centroids at once, and again from the first centroid whose choice an earlier pick could change.
"""

from __future__ import annotations

import numpy as np
import torch

TIE_RTOL = 1e-3
TIE_NOISE = 1e-5


def official_order(weights_by_time: np.ndarray) -> np.ndarray:
    """Positions of the centroids (listed by time) in the official DAM order: the official
    `torch.argsort(weights, descending=True)` of the float32 weights, on the CPU (see above)."""
    weights = torch.from_numpy(np.ascontiguousarray(weights_by_time, dtype=np.float32))
    return torch.argsort(weights, descending=True).numpy()


def pick_frames(sq_dist: np.ndarray, scale: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Rows of the retained frames that DAM uses, in choosing order (row i: centroid i's frame).

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
    return np.array(rows, dtype=np.int64)
