"""Scoring answers against references.

- Multiple choice (`mc`): the answer's option letter ("B", "(B)", "B. green", "The answer is B")
  or, failing that, the one option whose text the answer contains. Correct = same option as the
  reference. Score 1 or 0.
- Short answers (`short`): normalized (lower case, punctuation and articles dropped, number words
  zero..twenty -> digits). `exact`: answer == reference; `contains`: the reference's words occur in
  the answer as a contiguous run. Score = contains (1 or 0); both are reported. A list reference
  accepts any of its entries.
- Open answers (`open`): unscored, unless a scoring command is configured: it runs once per
  question with a JSON object on stdin
      {"id", "question", "prompt", "choices", "reference", "answer", "type"}
  and prints a number (the score) or a JSON object {"score": x, "correct": bool?}. Without
  "correct", correct = score >= threshold. A failing command leaves the question unscored
  and records the error.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from fvs_ros.bag.questions import LETTERS, Question

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}


@dataclass
class Score:
    score: Optional[float]  # None: unscored (no reference, open answer without a command, or an error)
    correct: Optional[bool]
    method: str  # choice-letter | choice-text | choice-none | exact | contains | command | unscored
    exact: Optional[bool] = None
    contains: Optional[bool] = None
    predicted: Optional[str] = None  # multiple choice: the option letter read from the answer
    detail: Optional[str] = None  # why unscored / scoring command output or error

    def as_dict(self) -> dict:
        return asdict(self)


def normalize(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _contains(answer_norm: str, ref_norm: str) -> bool:
    if not ref_norm:
        return False
    return f" {ref_norm} " in f" {answer_norm} "


_LETTER_ONLY = re.compile(r"\(?([A-Z])\)?[\.\):]?")
_LETTER_LEAD = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[\.\):])(?:\s|$)")
_LETTER_SAID = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?\(?([A-Z])\b\)?", re.IGNORECASE
)


def extract_choice(answer: str, choices: Sequence[str]) -> tuple[Optional[str], str]:
    """-> (letter or None, how it was read: letter | text | none)."""
    valid = LETTERS[: len(choices)]
    s = answer.strip()
    for m in (_LETTER_ONLY.fullmatch(s), _LETTER_LEAD.match(s)):
        if m:
            letter = next(g for g in m.groups() if g)
            if letter in valid:
                return letter, "letter"
    m = _LETTER_SAID.search(s)
    if m and m.group(1).upper() in valid and (m.group(1).isupper() or len(s) < 40):
        return m.group(1).upper(), "letter"
    a = normalize(s)
    hits = [i for i, c in enumerate(choices) if _contains(a, normalize(c))]
    if len(hits) > 1:  # "dark red" beats "red" when the answer names the longer option
        texts = {i: normalize(choices[i]) for i in hits}
        hits = [i for i in hits if not any(j != i and texts[i] in texts[j] for j in hits)]
    if len(hits) == 1:
        return valid[hits[0]], "text"
    return None, "none"


def score_answer(
    q: Question,
    answer: str,
    score_cmd: Optional[str] = None,
    *,
    cmd_all: bool = False,
    timeout: float = 60.0,
    threshold: float = 0.5,
) -> Score:
    if q.reference is None and not (score_cmd and (cmd_all or q.kind == "open")):
        return Score(None, None, "unscored", detail="no reference answer")
    if score_cmd and (cmd_all or q.kind == "open"):
        return run_score_cmd(score_cmd, q, answer, timeout=timeout, threshold=threshold)
    if q.kind == "mc":
        ref = q.reference_letter
        pred, how = extract_choice(answer, q.choices)
        ok = pred is not None and pred == ref
        return Score(1.0 if ok else 0.0, ok, f"choice-{how}", predicted=pred)
    if q.kind == "short":
        refs = q.reference if isinstance(q.reference, list) else [q.reference]
        a = normalize(answer)
        exact = any(a == normalize(r) for r in refs)
        contains = exact or any(_contains(a, normalize(r)) for r in refs)
        return Score(1.0 if contains else 0.0, contains, "exact" if exact else "contains", exact, contains)
    return Score(None, None, "unscored", detail="open answer (configure --score-cmd to score it)")


def run_score_cmd(
    cmd: str, q: Question, answer: str, *, timeout: float = 60.0, threshold: float = 0.5
) -> Score:
    payload = {
        "id": q.id,
        "question": q.question,
        "prompt": q.prompt(),
        "choices": q.choices,
        "reference": q.reference,
        "answer": answer,
        "type": q.kind,
    }
    try:
        proc = subprocess.run(
            shlex.split(cmd),
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, ValueError) as e:
        return Score(None, None, "command", detail=f"scoring command failed to start: {e}")
    except subprocess.TimeoutExpired:
        return Score(None, None, "command", detail=f"scoring command timed out after {timeout:g} s")
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return Score(
            None, None, "command", detail=f"scoring command exited with {proc.returncode}: {err[0][:200]}"
        )
    out = proc.stdout.strip()
    try:
        value = json.loads(out) if out else None
    except json.JSONDecodeError:
        value = out.split()[0] if out else None
    correct = None
    if isinstance(value, dict):
        correct = value.get("correct")
        value = value.get("score")
    try:
        score = float(value)
    except (TypeError, ValueError):
        return Score(None, None, "command", detail=f"scoring command printed no score: {out[:200]!r}")
    if not isinstance(correct, bool):
        correct = score >= threshold
    return Score(score, correct, "command", detail=out[:500])
