"""Question files: when to ask what, with optional choices and reference answers.

Formats (picked by suffix, or by content for .json):

- JSONL (`.jsonl`, `.ndjson`): one JSON object per line; blank lines and lines starting with
  `#` or `//` are skipped. A malformed line is reported with its line number and skipped; the
  other lines are used.
- YAML (`.yaml`, `.yml`): a list of mappings, or a mapping with a `questions:` list.
- JSON (`.json`): the same as a top-level array (or `{"questions": [...]}`), or a VStream-QA
  annotation file (see `load_vstream`).

Fields of one question (unknown fields are kept in the report as `meta`):

    time      stream time to ask at: seconds since the bag's first image (number or "SS.s",
              "MM:SS.s", "HH:MM:SS.s"), or "end" (after the last frame). Aliases: t, stream_time.
    question  the question text (required).
    id        optional; default "L<line>" (JSONL/YAML/JSON) or the VStream-QA id.
    choices   optional list of options (or {"A": ..., "B": ...}); the question becomes multiple
              choice, asked with the options as "A. ..." lines. Alias: options.
    answer    optional reference: for multiple choice a letter, a 0-based index or the option
              text; otherwise a short answer (or a list of accepted answers). Alias: reference.
    type      optional: mc | short | open. Default: mc with choices; short when the reference has
              at most 6 words (or is a list); open otherwise or without a reference.

Entries with `watch` (and no `question`) are conditions to watch, read by bag/watching.py.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

TIME_KEYS = ("time", "t", "stream_time", "time_s")
WATCH_KEYS = ("watch", "condition")  # entries with one of these (and no 'question'): bag/watching.py
KINDS = {
    "mc": "mc",
    "multiple_choice": "mc",
    "choice": "mc",
    "short": "short",
    "exact": "short",
    "open": "open",
    "open_ended": "open",
}
SHORT_MAX_WORDS = 6
LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class QuestionFileError(ValueError):
    """The whole file is unusable (unreadable, not YAML/JSON, wrong top-level shape)."""


@dataclass(frozen=True)
class QuestionIssue:
    """A question that was skipped or failed, with where it came from."""

    source: str
    line: Optional[int]
    message: str
    id: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"

    def as_dict(self) -> dict:
        return {"source": self.source, "line": self.line, "id": self.id, "message": self.message}


@dataclass
class Question:
    id: str
    question: str
    time: Optional[float]  # stream seconds; None when at_end
    at_end: bool = False
    choices: Optional[list[str]] = None
    reference: Union[str, list[str], None] = None
    kind: str = "open"  # mc | short | open
    line: Optional[int] = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    mc_instruction: str = MC_INSTRUCTION  # line after the options of a multiple-choice question

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    def prompt(self) -> str:
        """The text sent to the model (options and mc_instruction appended for multiple choice)."""
        if not self.choices:
            return self.question
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{opts}\n{self.mc_instruction}".rstrip()

    @property
    def reference_letter(self) -> Optional[str]:
        """For multiple choice: the reference as an option letter."""
        if self.kind != "mc" or self.reference is None:
            return None
        return _reference_letter(self.reference, self.choices)

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "line": self.line,
            "time": self.time,
            "at_end": self.at_end,
            "question": self.question,
            "choices": self.choices,
            "reference": self.reference,
            "type": self.kind,
            "meta": self.meta,
        }


# ----------------------------------------------------------------------------- field parsing


def parse_time(value) -> tuple[Optional[float], bool]:
    """-> (seconds, at_end). Accepts numbers, "12.5", "1:02.5", "01:00:02", "end"."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"time must be seconds, 'MM:SS', 'HH:MM:SS' or 'end', got {value!r}")
    if isinstance(value, (int, float)):
        t = float(value)
    else:
        s = str(value).strip().lower()
        if s == "end":
            return None, True
        parts = s.split(":")
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"cannot read time {value!r}")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot read time {value!r} (seconds, 'MM:SS', 'HH:MM:SS' or 'end')") from None
        if any(n < 0 for n in nums) or any(n >= 60 for n in nums[1:]):
            raise ValueError(f"cannot read time {value!r}")
        t = 0.0
        for n in nums:
            t = t * 60 + n
    if t != t or t in (float("inf"), float("-inf")):
        raise ValueError(f"time must be finite, got {value!r}")
    if t < 0:
        raise ValueError(f"time must be >= 0 s, got {t}")
    return t, False


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s+")


def _strip_option_prefix(text: str) -> str:
    """'A. red' / '(B) green' -> 'red' / 'green' (choices copied with their letters)."""
    return _OPTION_PREFIX.sub("", text, count=1).strip()


def _parse_choices(value) -> list[str]:
    if isinstance(value, dict):
        keys = list(value)
        if [str(k).strip().upper() for k in keys] != list(LETTERS[: len(keys)]):
            raise ValueError(f"choices given as a mapping must be keyed A, B, C, ... in order, got {keys}")
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"choices must be a list of strings, got {type(value).__name__}")
    if not 2 <= len(items) <= len(LETTERS):
        raise ValueError(f"choices must have 2 to {len(LETTERS)} options, got {len(items)}")
    out = []
    for c in items:
        if not isinstance(c, (str, int, float)) or isinstance(c, bool) or not str(c).strip():
            raise ValueError(f"every choice must be non-empty text, got {c!r}")
        out.append(_strip_option_prefix(str(c)))
    return out


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _reference_letter(ref, choices) -> str:
    """Reference for a multiple-choice question -> its letter; ValueError if it names no option."""
    n = len(choices)
    if isinstance(ref, int) and not isinstance(ref, bool):
        if 0 <= ref < n:
            return LETTERS[ref]
        raise ValueError(f"answer index {ref} is out of range for {n} choices")
    if isinstance(ref, list):
        raise ValueError("a multiple-choice answer must be one letter, index or option text")
    s = str(ref).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\.\)]?", s)
    if m and m.group(1).upper() in LETTERS[:n]:
        return m.group(1).upper()
    m = _OPTION_PREFIX.match(s)
    if m and m.group(1).upper() in LETTERS[:n]:
        return m.group(1).upper()
    matches = [i for i, c in enumerate(choices) if _norm(c) == _norm(s)]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise ValueError(f"answer {ref!r} is not one of the options {LETTERS[0]}-{LETTERS[n - 1]} or their text")


def question_from_dict(item: Any, *, source: str, line: Optional[int], default_id: str) -> Question:
    """Validate one entry; raises ValueError with a message meant for the user."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object with 'time' and 'question', got {type(item).__name__}")
    item = dict(item)
    text = item.pop("question", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing or empty 'question'")
    tkey = next((k for k in TIME_KEYS if k in item), None)
    if tkey is None:
        raise ValueError("missing 'time' (stream seconds, 'MM:SS' or 'end')")
    t, at_end = parse_time(item.pop(tkey))
    for k in TIME_KEYS:
        item.pop(k, None)
    qid = item.pop("id", None)
    qid = default_id if qid is None or str(qid).strip() == "" else str(qid)
    choices = None
    ckey = "choices" if "choices" in item else ("options" if "options" in item else None)
    if ckey is not None:
        raw = item.pop(ckey)
        choices = None if raw is None else _parse_choices(raw)
    rkey = "answer" if "answer" in item else ("reference" if "reference" in item else None)
    ref = item.pop(rkey) if rkey else None
    if isinstance(ref, str) and not ref.strip():
        ref = None
    if isinstance(ref, list):
        if not ref or not all(isinstance(r, (str, int, float)) and not isinstance(r, bool) for r in ref):
            raise ValueError("'answer' given as a list must hold non-empty texts")
        ref = [str(r) for r in ref]
    elif ref is not None and not isinstance(ref, str):
        if isinstance(ref, bool) or not isinstance(ref, (int, float)):
            raise ValueError(
                f"'answer' must be text, a list of texts or an option index, got {type(ref).__name__}"
            )
        if not choices:
            ref = str(ref)
    kind = item.pop("type", None)
    if kind is not None:
        if str(kind).lower() not in KINDS:
            raise ValueError(f"type must be one of mc, short, open; got {kind!r}")
        kind = KINDS[str(kind).lower()]
    if kind == "mc" and not choices:
        raise ValueError("type mc needs 'choices'")
    if choices and kind in (None, "mc"):
        kind = "mc"
        if ref is not None:
            _reference_letter(ref, choices)  # validate now, with the line number
    elif kind is None:
        if ref is None:
            kind = "open"
        elif isinstance(ref, list) or len(str(ref).split()) <= SHORT_MAX_WORDS:
            kind = "short"
        else:
            kind = "open"
    return Question(
        id=qid,
        question=text.strip(),
        time=t,
        at_end=at_end,
        choices=choices,
        reference=ref,
        kind=kind,
        line=line,
        source=source,
        meta=item,
    )


# ----------------------------------------------------------------------------- file formats


def _entries_jsonl(text: str, source: str, issues: list) -> list[tuple[Optional[int], Any]]:
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#") or s.startswith("//"):
            continue
        try:
            out.append((n, json.loads(s)))
        except json.JSONDecodeError as e:
            issues.append(
                QuestionIssue(source, n, f"malformed JSON ({e.msg} at column {e.colno}); line skipped")
            )
    return out


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line each mapping starts on (as '__line__')."""


def _construct_mapping(loader, node, deep=False):
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=deep)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(obj):
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__line__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _entries_yaml(text: str, source: str) -> list[tuple[Optional[int], Any]]:
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise QuestionFileError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if isinstance(doc, dict) and "questions" in doc:
        doc = doc["questions"]
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise QuestionFileError(f"{source}: expected a list of questions (or 'questions:' holding one)")
    out = []
    for item in doc:
        line = item.get("__line__") if isinstance(item, dict) else None
        out.append((line, _strip_lines(item)))
    return out


def _entries_json(text: str, source: str) -> list[tuple[Optional[int], Any]]:
    """Top-level array (or {"questions": [...]}) parsed item by item, keeping each item's line."""
    dec = json.JSONDecoder()
    start = 0
    m = re.match(r'\s*\{\s*"questions"\s*:\s*\[', text)
    if m:
        start = m.end()
    else:
        m = re.match(r"\s*\[", text)
        if not m:
            raise QuestionFileError(
                f'{source}: expected a JSON array of questions (or {{"questions": [...]}})'
            )
        start = m.end()
    out, i = [], start
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text):
            raise QuestionFileError(f"{source}: unterminated JSON array")
        if text[i] == "]":
            break
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise QuestionFileError(
                f"{source}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        out.append((text.count("\n", 0, i) + 1, obj))
        i = end
    return out


def _is_vstream(entries) -> bool:
    objs = [o for _, o in entries if isinstance(o, dict)]
    return (
        bool(objs)
        and all("video_id" in o and "question" in o for o in objs)
        and not any(k in o for o in objs for k in TIME_KEYS)
    )


def load_questions(
    path, *, video_id: Optional[str] = None, clips=None, time_offset: float = 0.0
) -> tuple[list[Question], list[QuestionIssue]]:
    """Read a question file -> (valid questions sorted by time, issues for skipped entries).

    Raises QuestionFileError when the file as a whole cannot be used. video_id / clips /
    time_offset apply to VStream-QA files (see load_vstream).
    """
    entries, issues = read_entries(path)
    if Path(path).suffix.lower() == ".json" and _is_vstream(entries):
        return load_vstream(entries, str(path), video_id=video_id, clips=clips, time_offset=time_offset)
    return _build([e for e in entries if not is_watch(e[1])], str(path), issues)


def read_entries(path) -> tuple[list[tuple[Optional[int], Any]], list[QuestionIssue]]:
    """The entries of a question file as (line, object), and issues for unreadable JSONL lines.

    Raises QuestionFileError when the file as a whole cannot be used."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuestionFileError(f"{source}: cannot read: {e}") from None
    issues: list[QuestionIssue] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _entries_jsonl(text, source, issues), issues
    if suffix in (".yaml", ".yml"):
        return _entries_yaml(text, source), issues
    if suffix == ".json":
        return _entries_json(text, source), issues
    raise QuestionFileError(f"{source}: unknown question file type {suffix!r} (.jsonl, .yaml, .yml, .json)")


def is_watch(item) -> bool:
    """A condition to watch (fvs_ros/bag/watching.py), not a question."""
    return isinstance(item, dict) and "question" not in item and any(k in item for k in WATCH_KEYS)


def _build(entries, source, issues, id_fn=None) -> tuple[list[Question], list[QuestionIssue]]:
    questions, seen = [], {}
    for n, (line, obj) in enumerate(entries):
        default_id = f"L{line}" if line else f"q{n + 1}"
        try:
            q = question_from_dict(obj, source=source, line=line, default_id=default_id)
        except ValueError as e:
            qid = obj.get("id") if isinstance(obj, dict) else None
            issues.append(
                QuestionIssue(source, line, f"{e}; question skipped", None if qid is None else str(qid))
            )
            continue
        if q.id in seen:
            issues.append(
                QuestionIssue(
                    source,
                    line,
                    f"duplicate id {q.id!r} (first on line {seen[q.id]}); question skipped",
                    q.id,
                )
            )
            continue
        seen[q.id] = line
        questions.append(q)
    questions.sort(key=lambda q: (q.at_end, q.time or 0.0))
    return questions, issues


# ----------------------------------------------------------------------------- VStream-QA


def load_vstream(
    entries, source: str, *, video_id: Optional[str] = None, clips=None, time_offset: float = 0.0
) -> tuple[list[Question], list[QuestionIssue]]:
    """VStream-QA annotations (IVGSZ/VStream-QA, `test_qa_ego4d.json`, `test_qa_movienet.json`).

    Fields read from each entry: `video_id`, `question`, `answer` (reference; open-ended text),
    `id`, and when present `answer_type`, `duration` (kept as meta). The entries carry no ask time:

    - Without `clips`: the bag holds one clip (`video_id`); every question about it is asked at
      the end of the stream (time "end"), which is how RVS-Ego / RVS-Movie clips are cut: each
      clip ends where its questions are asked.
    - With `clips` (the RVS clip list, `rvs_ego.json`: entries with `video_id`, `original_video`,
      `start_time`, `end_time` in seconds of the original video): the bag holds one *original*
      video (`video_id` names it, or a clip of it) and each question about one of its clips is
      asked at that clip's `end_time` - `time_offset` (use the bag's start in the original video,
      e.g. the converter's --start). MovieNet clips (`start_shot` / `end_shot`) have no times;
      convert each clip separately and use the first form.
    """
    issues: list[QuestionIssue] = []
    objs = [(line, o) for line, o in entries if isinstance(o, dict)]
    for line, o in entries:
        if not isinstance(o, dict):
            issues.append(QuestionIssue(source, line, "expected an object; entry skipped"))
    clip_map = _load_clips(clips) if clips else None
    if clip_map is not None:
        originals = {c.get("original_video") for c in clip_map.values()}
        if video_id is None:
            raise QuestionFileError(
                f"{source}: with a clip list, name the original video in the bag (--video-id)"
            )
        if video_id in clip_map:
            video_id = clip_map[video_id].get("original_video")
        if video_id not in originals:
            raise QuestionFileError(f"{source}: video {video_id!r} is not an original_video of the clip list")
    else:
        ids = sorted({str(o["video_id"]) for _, o in objs})
        if video_id is None:
            if len(ids) != 1:
                raise QuestionFileError(
                    f"{source}: VStream-QA file with questions on {len(ids)} videos; choose the "
                    f"bag's video with --video-id (e.g. {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})"
                )
            video_id = ids[0]
    picked = []
    for line, o in objs:
        vid = str(o["video_id"])
        item = {"question": o.get("question"), "answer": o.get("answer"), "id": o.get("id"), "type": "open"}
        ref = o.get("answer")
        if isinstance(ref, str) and len(ref.split()) <= SHORT_MAX_WORDS:
            item["type"] = "short"
        item.update({k: o[k] for k in ("answer_type", "duration") if k in o})
        item["video_id"] = vid
        if clip_map is not None:
            clip = clip_map.get(vid)
            if clip is None or clip.get("original_video") != video_id:
                continue
            end = clip.get("end_time")
            if not isinstance(end, (int, float)) or isinstance(end, bool):
                issues.append(
                    QuestionIssue(
                        source,
                        line,
                        f"clip {vid!r} has no numeric end_time; question skipped",
                        None if o.get("id") is None else str(o.get("id")),
                    )
                )
                continue
            item["time"] = float(end) - time_offset
            item["clip_start_time"], item["clip_end_time"] = clip.get("start_time"), end
        else:
            if vid != video_id:
                continue
            item["time"] = "end"
        picked.append((line, item))
    if not picked:
        issues.append(QuestionIssue(source, None, f"no questions for video {video_id!r}"))
    questions, _ = _build(picked, source, issues)  # appends to issues
    return questions, issues


def _load_clips(clips) -> dict:
    if isinstance(clips, (str, Path)):
        try:
            data = json.loads(Path(clips).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise QuestionFileError(f"{clips}: cannot read clip list: {e}") from None
    else:
        data = clips
    if isinstance(data, dict):
        data = list(data.values()) if all(isinstance(v, dict) for v in data.values()) else [data]
    if not isinstance(data, list):
        raise QuestionFileError(f"{clips}: clip list must be a JSON array of clips")
    return {str(c["video_id"]): c for c in data if isinstance(c, dict) and "video_id" in c}
