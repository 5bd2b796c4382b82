"""Checkpoint loading: weight-name mapping, tiny checkpoints of every format, and the errors users see."""

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fvs_ros.model import ModelLoadError, checkpoint, load_model, map_weight_name, resolve_device_dtype
from fvs_ros.model.preprocess import slot_patches
from fvs_ros.model.tiny import FORMATS, write_tiny_checkpoint
from fvs_ros.model.tiny import main as tiny_main

OFFICIAL_CKPT = Path(__file__).parents[1] / "data" / "official_reference" / "tiny_ckpt"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: write_tiny_checkpoint(root / fmt, fmt) for fmt in FORMATS}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for file in dst.iterdir():
        file.chmod(0o644)
    return dst


def test_weight_mapping_covers_official_checkpoint_exactly():
    """Every tensor of the official format maps to a distinct parameter, and every parameter is loaded."""
    with safe_open(OFFICIAL_CKPT / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    mapped = {map_weight_name(n) for n in names}
    lm = load_model(OFFICIAL_CKPT)
    params = set(lm.model.state_dict())
    assert len(mapped) == len(names) == 58
    assert mapped == params
    assert not any(b.is_meta for b in lm.model.buffers())
    loaded = load_file(OFFICIAL_CKPT / "model.safetensors")
    state = lm.model.state_dict()
    assert all(torch.equal(state[map_weight_name(n)], t) for n, t in loaded.items())


def test_map_weight_name_examples():
    assert map_weight_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert (
        map_weight_name("model.layers.3.mlp.up_proj.weight")
        == "model.language_model.layers.3.mlp.up_proj.weight"
    )
    assert map_weight_name("model.norm.weight") == "model.language_model.norm.weight"
    assert map_weight_name("visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0.attn.qkv.bias"
    assert map_weight_name("visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"
    assert map_weight_name("lm_head.weight") == "lm_head.weight"
    assert map_weight_name("model.visual.patch_embed.proj.weight") == "model.visual.patch_embed.proj.weight"


def test_tiny_official_format_matches_official_layout(tiny_dirs):
    ours = json.loads((tiny_dirs["flash_vstream"] / "config.json").read_text())
    official = json.loads((OFFICIAL_CKPT / "config.json").read_text())
    assert ours["model_type"] == official["model_type"] == "flash_vstream_qwen2_vl"
    assert ours["vision_config"]["flash_memory_config"] == official["vision_config"]["flash_memory_config"]
    with (
        safe_open(tiny_dirs["flash_vstream"] / "model.safetensors", framework="pt") as a,
        safe_open(OFFICIAL_CKPT / "model.safetensors", framework="pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_answers(tiny_dirs, fmt, rng_frames):
    lm = load_model(tiny_dirs[fmt])
    assert lm.model_type == {"flash_vstream": "flash_vstream_qwen2_vl"}.get(fmt, fmt)
    expected_memory = (
        {"csm_slots": 4, "dam_frames": 2} if fmt == "flash_vstream" else {"csm_slots": 60, "dam_frames": 30}
    )
    assert lm.memory_defaults == expected_memory
    feats = lm.encode_frames(rng_frames)
    assert feats.full.shape == (3, 8 * 16, lm.feature_dim) and feats.low.shape == (3, 4 * 8, lm.feature_dim)
    snap = snapshot_of(feats)
    gen = lm.answer(lm.prefill_memory(snap), "What happens?", max_new_tokens=4)
    assert 1 <= len(gen.token_ids) <= 4 and isinstance(gen.text, str)
    assert 0 < gen.ttft_s <= gen.total_s


@pytest.mark.parametrize("fmt", ["qwen2_vl", "qwen2_5_vl"])
def test_pre_merger_features_are_in_qwen2_vl_order(tiny_dirs, fmt, rng_frames):
    """Merging our pre-merger features reproduces the ViT's own merged output (Qwen2.5-VL: window order
    undone)."""
    lm = load_model(tiny_dirs[fmt])
    feats = lm.encode_frames(rng_frames[:1])
    patches = slot_patches(torch.from_numpy(rng_frames[:1]), 1)
    grid = torch.tensor([[1, *patches.full_hw]])
    with torch.inference_mode():
        merged = lm.visual(patches.full, grid_thw=grid).pooler_output
    torch.testing.assert_close(lm.project(feats.full), merged, rtol=1e-4, atol=1e-5)


def test_tiny_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    tiny_main([str(tmp_path / "ckpt"), "--format", "qwen2_vl", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt").model_type == "qwen2_vl"


def test_dtype_is_the_callers_and_rotary_stays_float32(tiny_dirs):
    lm = load_model(tiny_dirs["qwen2_vl"], dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.llm.rotary_emb.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------- errors


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str):
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__  # no chained stack trace


def test_missing_source(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "nowhere")
    assert_one_line(err, "does not exist")


def test_source_is_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "weights.bin")
    assert_one_line(err, "is a file")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert_one_line(err, "no config.json")


def set_model_type(config):
    config["model_type"] = "llava"


def set_memory_method(config):
    config["vision_config"]["flash_memory_config"]["flash_memory_temporal_method"] = "dbscan"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (set_model_type, "unsupported model_type 'llava'"),
        (set_memory_method, "flash_memory_temporal_method='dbscan'"),
    ],
)
def test_unsupported_config(tmp_path, edit, fragment):
    ckpt = copy_checkpoint(OFFICIAL_CKPT, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(ckpt)
    assert_one_line(err, fragment)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda w: w.pop("visual.merger.mlp.2.bias"), "1 missing ['model.visual.merger.mlp.2.bias']"),
        (lambda w: w.update({"visual.extra.weight": torch.zeros(2)}), "1 unexpected ['visual.extra.weight']"),
    ],
)
def test_missing_or_unexpected_weights(tmp_path, edit, fragment):
    ckpt = copy_checkpoint(OFFICIAL_CKPT, tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    edit(weights)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_model(ckpt)
    assert_one_line(err, "weights do not match", fragment)


def test_weights_that_do_not_fit(monkeypatch):
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: 1000)
    with pytest.raises(ModelLoadError) as err:
        load_model(OFFICIAL_CKPT)
    assert_one_line(err, "weights need", "GiB free")


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach the network
    with pytest.raises(ModelLoadError) as err:
        load_model("fvs-test-org/no-such-model")
    assert_one_line(err, "could not be fetched from the hub")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rng_frames():
    return torch.randint(
        0, 256, (3, 112, 224, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    ).numpy()


def snapshot_of(feats):
    """A memory holding every slot in CSM (times 0..B-1) and the first two in DAM."""
    n = feats.low.shape[0]
    return SimpleNamespace(
        csm_features=feats.low.float(),
        csm_weights=torch.ones(n),
        csm_times=torch.arange(n, dtype=torch.float64),
        dam_features=feats.full[:2],
        dam_slots=torch.arange(2),
        frames_seen=n,
        version=1,
        full_hw=feats.full_hw,
    )


def test_device_and_dtype_by_name_or_auto():
    assert resolve_device_dtype("auto", "auto") == (
        (torch.device("cuda"), torch.bfloat16)
        if torch.cuda.is_available()
        else (torch.device("cpu"), torch.float32)
    )
    assert resolve_device_dtype("cpu", "float16") == (torch.device("cpu"), torch.float16)
    assert resolve_device_dtype(torch.device("cpu"), torch.bfloat16) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device_dtype("gpu7", "auto")


def shard_checkpoint(ckpt: Path, names: dict) -> None:
    """Split model.safetensors into the shards `names` gives (shard name -> tensor predicate), with
    an index naming them."""
    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    weight_map = {}
    for shard, wanted in names.items():
        part = {n: t for n, t in weights.items() if wanted(n)}
        save_file(part, ckpt / shard)
        weight_map.update({n: shard for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_loads(tmp_path):
    ckpt = copy_checkpoint(OFFICIAL_CKPT, tmp_path / "ckpt")
    shard_checkpoint(
        ckpt,
        {
            "a.safetensors": lambda n: n.startswith("visual."),
            "b.safetensors": lambda n: not n.startswith("visual."),
        },
    )
    assert len(load_model(ckpt).model.state_dict()) == 58


@pytest.mark.parametrize("escape", ["../../etc/hostname", "/etc/hostname", "link.safetensors"])
def test_a_shard_outside_the_checkpoint_is_refused(tmp_path, escape):
    """Issue 24 item 16: an index naming `../../etc/hostname` made the loader open that file. Shard
    names are file names inside the checkpoint directory; a symlink out of it is refused too."""
    outside = tmp_path / "outside.safetensors"
    ckpt = copy_checkpoint(OFFICIAL_CKPT, tmp_path / "ckpt")
    shard_checkpoint(ckpt, {"a.safetensors": lambda n: True})
    save_file({"x": torch.zeros(1)}, outside)
    (ckpt / "link.safetensors").symlink_to(outside)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["visual.merger.mlp.2.bias"] = escape
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_model(ckpt)
    assert_one_line(err, repr(escape))
    assert "outside the checkpoint" in str(err.value) or "not a file name" in str(err.value)


LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 1e10 steps


def test_a_chat_template_that_never_ends_fails_the_load_instead_of_hanging(tmp_path):
    """Issue 24 item 11: a template looping 1e10 times (each range() within jinja's sandbox limit)
    hung configure for good. Rendering has a step budget; past it the load fails, saying why."""
    ckpt = copy_checkpoint(OFFICIAL_CKPT, tmp_path / "ckpt")
    template = json.loads((ckpt / "chat_template.json").read_text())
    template["chat_template"] = LOOPING + template["chat_template"]
    (ckpt / "chat_template.json").write_text(json.dumps(template))
    with pytest.raises(ModelLoadError) as err:
        load_model(ckpt)
    assert_one_line(err, "unusable chat template", "did not finish within")


def test_the_render_budget_works_off_the_main_thread():
    """Configure runs on an executor thread, where no signal can interrupt a render."""
    from fvs_ros.model.prompt import TemplateTooLong, render_bounded

    def spin():
        n = 0
        while True:
            n += 1

    outcome = []

    def run():
        try:
            render_bounded(spin, budget=10_000)
        except TemplateTooLong as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and len(outcome) == 1
    assert render_bounded(lambda: "ok", budget=10) == "ok"
