"""Node parameters -> EngineConfig / MemoryConfig / Watcher: the one mapping, used by the node, the offline
bag evaluation and the video CLI, so a setting means the same everywhere.

No ROS here (the video CLI runs without it). Parameter names, types and ranges: fvs_ros/ros/params.py;
default values: config/fvs.yaml. An engine setting taken from a parameter is one line in
ENGINE_PARAMS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import yaml

from fvs_ros.engine.stream_engine import EngineConfig
from fvs_ros.engine.watch import Watcher
from fvs_ros.memory import MemoryConfig

PACKAGE = "fvs_ros"

ENGINE_PARAMS = {  # node parameter -> EngineConfig field
    "memory_fps": "sample_fps",
    "frames_per_slot": "frames_per_slot",
    "queue_size": "queue_size",
    "max_question_chars": "max_question_chars",
    "max_new_tokens": "max_new_tokens",
    "default_timeout_s": "answer_timeout_s",
    "system_prompt": "system_prompt",
    "summary_prompt": "summary_prompt",
    "summary_max_new_tokens": "summary_max_new_tokens",
    "summary_period_s": "summary_period_s",
    "prefix_refresh_s": "prefix_refresh_s",
    "max_prefix_lag_s": "max_prefix_lag_s",
    "evidence_frames": "evidence_frames",
    "thumbnail_side": "thumbnail_side",
}
MEMORY_PARAMS = ("csm_slots", "dam_frames")  # same names in MemoryConfig


def engine_config(params: Mapping, **overrides) -> EngineConfig:
    """EngineConfig from parameter values (missing ones keep EngineConfig's defaults), then `overrides`
    (EngineConfig fields). Requests are clamped to max_new_tokens, so the model reserves for the
    larger of that and summary_max_new_tokens. Raises ValueError for out-of-range values."""
    fields = {field: params[name] for name, field in ENGINE_PARAMS.items() if params.get(name) is not None}
    fields.update(overrides)
    fields.setdefault(
        "max_new_tokens_limit",
        max(
            fields.get("max_new_tokens", EngineConfig.max_new_tokens),
            fields.get("summary_max_new_tokens", EngineConfig.summary_max_new_tokens),
        ),
    )
    return EngineConfig(**fields)


def memory_config(params: Mapping, defaults: Mapping = ()) -> MemoryConfig:
    """MemoryConfig from parameter values over `defaults` (e.g. the checkpoint's lm.memory_defaults)."""
    values = {**dict(defaults), **{k: int(params[k]) for k in MEMORY_PARAMS if params.get(k) is not None}}
    return MemoryConfig(**values)


def watch_config(params: Mapping) -> Watcher:
    """An empty Watcher with the parameters' cap and hysteresis (Watcher's defaults where missing)."""
    values = {
        "max_conditions": params.get("watch_max_conditions"),
        "hysteresis": params.get("watch_hysteresis"),
    }
    return Watcher(**{k: v for k, v in values.items() if v is not None})


def defaults_file() -> Path:
    """config/fvs.yaml beside this code (source checkout), else the installed share/fvs_ros copy."""
    source = Path(__file__).resolve().parents[2] / "config" / "fvs.yaml"
    if source.is_file():
        return source
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / "config" / "fvs.yaml"


def read_params_file(path) -> dict:
    """Values of a ROS 2 params file (every `<node>: ros__parameters:` section, merged in order).

    Raises ValueError naming the file when it cannot be read or holds no such section."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read params file {path}: {e}") from None
    sections = [
        section["ros__parameters"]
        for section in (doc.values() if isinstance(doc, dict) else ())
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict)
    ]
    if not sections:
        raise ValueError(f"params file {path} has no '<node name>: ros__parameters:' section")
    values: dict = {}
    for section in sections:
        values.update(section)
    return values
