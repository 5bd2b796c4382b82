"""fvs_ros.engine.settings: the one mapping from node parameters to EngineConfig / MemoryConfig."""

from __future__ import annotations

import dataclasses

import pytest

from fvs_ros.engine import EngineConfig
from fvs_ros.engine.settings import (
    ENGINE_PARAMS,
    defaults_file,
    engine_config,
    memory_config,
    read_params_file,
    watch_config,
)
from fvs_ros.model.prompt import DEFAULT_SYSTEM_PROMPT


def test_the_yaml_defaults_build_the_node_configs():
    p = read_params_file(defaults_file())
    config, memory = engine_config(p), memory_config(p)
    for name, field in ENGINE_PARAMS.items():
        assert getattr(config, field) == p[name], name
    assert (memory.csm_slots, memory.dam_frames) == (p["csm_slots"], p["dam_frames"])
    assert config.max_new_tokens_limit == max(p["max_new_tokens"], p["summary_max_new_tokens"])
    assert p["system_prompt"] == DEFAULT_SYSTEM_PROMPT == EngineConfig().system_prompt
    watcher = watch_config(p)
    assert (watcher.max_conditions, watcher.hysteresis) == (p["watch_max_conditions"], p["watch_hysteresis"])
    assert len(watcher) == 0


def test_every_mapped_field_exists_and_overrides_win():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(ENGINE_PARAMS.values()) <= fields
    config = engine_config({"memory_fps": 2.0, "max_new_tokens": 7}, max_prefix_lag_s=0.5)
    assert (config.sample_fps, config.max_new_tokens, config.max_prefix_lag_s) == (2.0, 7, 0.5)
    assert memory_config({"csm_slots": None}, {"csm_slots": 8, "dam_frames": 4}).csm_slots == 8


def test_a_params_file_that_does_not_read_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read params file"):
        read_params_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory_fps: 2\n")
    with pytest.raises(ValueError, match="ros__parameters"):
        read_params_file(bad)
    with pytest.raises(ValueError, match="queue_size"):
        engine_config({"queue_size": 0})


def test_offline_evaluation_refuses_an_unreadable_params_file(tmp_path):
    from fvs_ros.bag.evaluate import _node_params

    with pytest.raises(SystemExit, match="cannot read params file"):
        _node_params(str(tmp_path / "missing.yaml"))
    assert _node_params(None)["system_prompt"] == DEFAULT_SYSTEM_PROMPT
