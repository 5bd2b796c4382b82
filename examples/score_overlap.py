#!/usr/bin/env python3
"""Example scoring command for open answers.

Use: python -m fvs_ros.bag.evaluate ... --score-cmd "python examples/score_overlap.py"

Reads {"id", "question", "prompt", "choices", "reference", "answer", "type"} as JSON on stdin and
prints {"score": s, "correct": bool}: s = share of the reference's content words found in the
answer. A stand-in for an LLM judge: replace it with a command that calls your judge model.
"""

import json
import re
import sys

STOP = set(
    "a an the of to in on and or is are was were it its this that with for at by from as be then".split()
)


def words(text):
    return {w for w in re.findall(r"[a-z0-9]+", str(text).lower()) if w not in STOP}


item = json.load(sys.stdin)
refs = item["reference"] if isinstance(item["reference"], list) else [item["reference"] or ""]
answer = words(item["answer"])
score = max((len(words(r) & answer) / len(words(r)) if words(r) else 0.0) for r in refs)
print(json.dumps({"score": round(score, 3), "correct": score >= 0.5}))
