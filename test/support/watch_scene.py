"""A planted scene change for the watch tests, and what a condition should do there, computed
independently of the engine and the node.

The stream: DARK_SLOTS two-frame slots of a dark frame, then BRIGHT_SLOTS of a red-and-white
one. For each memory state (one per slot) the probability of a condition is computed with a
plain transformers forward over the whole prompt (reference_probability); the threshold is put
halfway between the values right before and right after the change, for the condition that
jumps most there; the expected events follow from the documented hysteresis rule applied to
those probabilities (expected_events, written here again, not imported from fvs_ros.engine.watch).
hysteresis_case finds a threshold and a hysteresis for which that rule's events depend on the
hysteresis, so a test can tell whether a node honours it.
"""

from __future__ import annotations

import numpy as np

from fvs_ros.model.conditions import condition_question, yes_no_tokens, yes_probability

H, W = 112, 224
DARK_SLOTS, BRIGHT_SLOTS = 12, 6
CANDIDATES = (
    "a cup is on the table",
    "the light is on",
    "a red ball is on the floor",
    "the room is dark",
    "a person is at the door",
)


def frame(bright: bool) -> np.ndarray:
    f = np.full((H, W, 3), 20, np.uint8)
    if bright:
        f[:, : W // 2] = (255, 40, 40)
        f[:, W // 2 :] = 250
    return f


def slots() -> list[list[np.ndarray]]:
    """The stream as slots of two frames."""
    return [[frame(i >= DARK_SLOTS)] * 2 for i in range(DARK_SLOTS + BRIGHT_SLOTS)]


def reference_probability(lm, snapshot, condition: str) -> float:
    inputs = lm.prompt_inputs(snapshot, condition_question(condition))
    return float(yes_probability(lm.logits(inputs)[-1:], yes_no_tokens(lm.tokenizer))[0])


def expected_events(probabilities, threshold: float, hysteresis: float) -> list[tuple[int, bool]]:
    """(index, rising) of the events the documented rule gives for a sequence of probabilities."""
    active, events = False, []
    for i, p in enumerate(probabilities):
        if not active and p >= threshold:
            active = True
            events.append((i, True))
        elif active and p < threshold - hysteresis:
            active = False
            events.append((i, False))
    return events


def plant(
    by_condition: dict[str, list[float]], hysteresis: float
) -> tuple[str, float, list[tuple[int, bool]]]:
    """(condition, threshold, expected events) for the candidate that jumps most at the change; the
    threshold lies halfway across the jump, so an event falls exactly on the first bright slot."""
    k = DARK_SLOTS

    def jump(c):
        return abs(by_condition[c][k] - by_condition[c][k - 1])

    condition = max(by_condition, key=jump)
    before, after = by_condition[condition][k - 1], by_condition[condition][k]
    assert jump(condition) > 4 * hysteresis, f"no clear jump at the change: {by_condition}"
    threshold = (before + after) / 2
    events = expected_events(by_condition[condition], threshold, hysteresis)
    assert (k, after > before) in events, (condition, threshold, events)  # the planted crossing
    return condition, threshold, events


def hysteresis_case(probabilities, margin: float = 1e-3) -> tuple[float, float]:
    """(threshold, hysteresis) within the range of `probabilities` for which expected_events gives
    events, and other events than with no hysteresis (a fall that the margin holds back); no
    probability lies within `margin` of the threshold or of threshold - hysteresis, so values
    computed elsewhere to within that margin give the same events."""
    values = sorted(set(probabilities))
    spread = values[-1] - values[0]
    for hysteresis in (spread / 2, spread / 4, spread / 8, spread / 16):
        for lo, hi in zip(values, values[1:], strict=False):
            threshold = (lo + hi) / 2
            if min(abs(p - x) for p in values for x in (threshold, threshold - hysteresis)) < margin:
                continue
            events = expected_events(probabilities, threshold, hysteresis)
            if events and events != expected_events(probabilities, threshold, 0.0):
                return threshold, hysteresis
    raise AssertionError(f"no threshold at which hysteresis changes the events: {probabilities}")
