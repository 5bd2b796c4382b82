"""Evidence items of an answer: the memory blocks it attended to most, as moments of the stream.

The model measures the answer's attention per memory block (fvs_ros.model.evidence); this module
turns the heaviest blocks into stream terms with the memory snapshot the answer was computed from:

- a detail (DAM) frame is one frame: its stamp and slot;
- a context (CSM) centroid stands for all the frames it absorbed: the stamp and slot of the
  retained frame nearest to it (the frame that best shows it), the span of its members' stamps
  and its weight (frames absorbed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

DETAIL, CONTEXT = "detail", "context"


@dataclass(frozen=True)
class EvidenceItem:
    """One memory block an answer rests on."""

    kind: str  # DETAIL (a DAM frame) or CONTEXT (a CSM centroid)
    stamp: float  # the frame's stamp (context: of the retained frame nearest to the centroid)
    slot: int  # that frame's memory slot index (arrival order)
    share: float  # this block's share of the answer's attention to memory (all blocks sum to 1)
    span: tuple[float, float]  # detail: (stamp, stamp); context: earliest and latest member stamps
    weight: int  # frames the block stands for (detail: 1; context: frames the centroid absorbed)
    image: Optional[np.ndarray] = None  # RGB thumbnail of that frame, when the engine holds one


def evidence_items(shares, snapshot, count: int, thumbnails=None) -> tuple[EvidenceItem, ...]:
    """The `count` blocks with the largest shares, largest first.

    shares [D' + K']: per memory block in prompt order (the snapshot's DAM frames, then its
    centroids), e.g. BlockAttention.shares(); thumbnails: a ThumbnailStore (or None).
    """
    shares = np.asarray(shares, dtype=np.float64)
    dam = len(snapshot.dam_slots)
    if shares.shape != (dam + len(snapshot.csm_weights),):
        raise ValueError(
            f"{shares.shape[0]} shares for {dam} DAM frames + {len(snapshot.csm_weights)} centroids"
        )
    items = []
    for b in np.argsort(-shares, kind="stable")[: max(0, count)]:
        if b < dam:
            stamp, slot = float(snapshot.dam_stamps[b]), int(snapshot.dam_slots[b])
            kind, span, weight = DETAIL, (stamp, stamp), 1
        else:
            c = b - dam
            stamp, slot = float(snapshot.csm_nearest_stamps[c]), int(snapshot.csm_nearest_slots[c])
            kind, weight = CONTEXT, int(snapshot.csm_weights[c])
            span = (float(snapshot.csm_spans[c, 0]), float(snapshot.csm_spans[c, 1]))
        image = thumbnails.get(slot) if thumbnails is not None else None
        items.append(EvidenceItem(kind, stamp, slot, float(shares[b]), span, weight, image))
    return tuple(items)
