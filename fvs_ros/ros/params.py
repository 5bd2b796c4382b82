"""The node's parameters: descriptions, types and ranges here, default values in config/fvs.yaml.

`declare(node)` declares every parameter with a ParameterDescriptor and the default read from
the YAML file (`defaults_file()`), so the node run bare, the node run with the file and the
launch file all agree. Values given on the command line or in another params file override
those defaults as usual. Each parameter applies at one lifecycle transition: `configure`
(model, engine) or `activate` (subscription, memory file); it can be changed only while the
node is in a state before that transition (see `check_change`).

Several cameras: `cameras` names them; each camera's image_topic, image_transport and
reliability are the parameters `cameras.<name>.<setting>` (CAMERA_SPECS), declared at configure
for the names `cameras` holds then, empty = derived (`<name>/image_raw`, the node-wide value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import InvalidTopicNameException, ParameterUninitializedException
from rclpy.parameter import Parameter
from rclpy.validate_topic_name import validate_topic_name

from fvs_ros.engine.settings import defaults_file

CONFIGURE, ACTIVATE = "configure", "activate"

_TYPES = {
    str: ParameterType.PARAMETER_STRING,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    bool: ParameterType.PARAMETER_BOOL,
    list: ParameterType.PARAMETER_STRING_ARRAY,  # (lists of strings only)
}
# A camera name: it becomes part of parameter names, topic names and a directory name.
_CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Spec:
    type: type
    applies: str  # CONFIGURE or ACTIVATE
    description: str
    choices: tuple = ()  # allowed values (strings); an N stands for a number: 'cuda:N'
    range: Optional[tuple] = None  # (min, max), inclusive
    # 0 has a meaning of its own (off, every frame): a positive value must be at least this, since
    # a rate or period below it never comes or fires continuously (ranges cannot say "0 or >= x")
    positive_min: Optional[float] = None
    topic: bool = False  # a ROS topic name (relative or absolute), checked by rclpy's rule

    def descriptor(self, name: str) -> ParameterDescriptor:
        d = ParameterDescriptor(name=name, type=_TYPES[self.type], description=self.description)
        constraints = [f"applies at {self.applies}"]
        if self.choices:
            constraints.append("one of: " + " | ".join(self.choices))
        if self.positive_min is not None:
            constraints.append(f"0 or at least {self.positive_min:g}")
        if self.topic:
            constraints.append("a valid ROS topic name")
        d.additional_constraints = "; ".join(constraints)
        if self.range is not None and self.type is int:
            d.integer_range = [IntegerRange(from_value=self.range[0], to_value=self.range[1], step=1)]
        elif self.range is not None:
            d.floating_point_range = [
                FloatingPointRange(from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)
            ]
        return d

    def check(self, value) -> Optional[str]:
        """Why `value` is not allowed (ranges are enforced by rclpy itself), or None."""
        if self.choices and not any(
            re.fullmatch(re.escape(c).replace("N", r"\d+"), str(value)) for c in self.choices
        ):
            return f"'{value}' is not one of {', '.join(self.choices)}"
        if self.positive_min is not None and 0 < value < self.positive_min:
            return f"{value:g} is too small to work: use 0 or a value of at least {self.positive_min:g}"
        if self.topic:
            try:
                validate_topic_name(value)
            except InvalidTopicNameException as e:  # its first line says why; then the name, a caret
                why = str(e).splitlines()[0].removeprefix("Invalid topic name: ").rstrip(":")
                return f"{value!r} is not a valid ROS topic name: {why}"
        return None


SPECS = {
    # camera input
    "cameras": Spec(
        list,
        CONFIGURE,
        "Camera names; each camera gets its own memory on the one model, its image topic "
        "cameras.<name>.image_topic (default <name>/image_raw), transport and reliability. "
        "Empty: one camera on image_topic.",
    ),
    "image_topic": Spec(
        str,
        ACTIVATE,
        "Image topic to watch (relative names follow the node namespace); "
        "with image_transport=compressed the node subscribes to <image_topic>/compressed.",
        topic=True,
    ),
    "image_transport": Spec(
        str,
        ACTIVATE,
        "raw: sensor_msgs/Image; compressed: sensor_msgs/CompressedImage.",
        choices=("raw", "compressed"),
    ),
    "reliability": Spec(
        str,
        ACTIVATE,
        "Image subscription reliability (best_effort = sensor-data QoS).",
        choices=("best_effort", "reliable"),
    ),
    "qos_depth": Spec(int, ACTIVATE, "Images buffered per subscription (keep-last depth).", range=(1, 10)),
    "raw_intake": Spec(
        bool,
        ACTIVATE,
        "Take images serialized and read only their header first: frames the memory sampler skips "
        "are never deserialized or decoded. false: rclpy deserializes every message (slower).",
    ),
    "max_image_pixels": Spec(
        int,
        ACTIVATE,
        "Images larger than this (width x height, raw or as declared by a JPEG/PNG header) are "
        "dropped as malformed, compressed ones before decoding.",
        range=(1, 2**31 - 1),
    ),
    "max_stamp_ahead_s": Spec(
        float,
        ACTIVATE,
        "A stamp further ahead of the node clock than this, or not positive, is replaced by the "
        "clock's time when the image arrived (counted as restamped).",
        range=(0.0, 1e9),
    ),
    "memory_file": Spec(
        str,
        ACTIVATE,
        "Directory holding a saved memory: restored at activate if it exists, "
        "written at deactivate and shutdown and by ~/save_memory. Empty: off.",
    ),
    "save_period_s": Spec(
        float,
        ACTIVATE,
        "While active, save memory_file this often (wall clock) if memory changed: a crash loses "
        "at most this much. 0: only at deactivate, shutdown and ~/save_memory.",
        range=(0.0, 86400.0),
        positive_min=0.1,
    ),
    # model and memory
    "model": Spec(str, CONFIGURE, "Checkpoint: Hugging Face hub id or local directory."),
    "device": Spec(
        str,
        CONFIGURE,
        "Torch device; auto = cuda if available, else cpu.",
        choices=("auto", "cpu", "cuda", "cuda:N"),
    ),
    "dtype": Spec(
        str,
        CONFIGURE,
        "Model dtype; auto = bfloat16 on CUDA, float32 on CPU.",
        choices=("auto", "bfloat16", "float16", "float32"),
    ),
    "weights": Spec(
        str,
        CONFIGURE,
        "Weights of the language model's linear layers: bf16 = the checkpoint's numerics (in dtype); "
        "fp8 = e4m3 weights and per-token activation scales (GPUs with FP8 tensor cores: Ada, Hopper); "
        "int8 = 8-bit weight-only (any GPU, CPU). Quantized at configure from the checkpoint; 8-bit "
        "weights are not the numerics the checkpoint was evaluated with.",
        choices=("bf16", "fp8", "int8"),
    ),
    "max_gpu_memory": Spec(
        float,
        CONFIGURE,
        "GiB of device memory this node may take; configure estimates weights, memory, prefix KV "
        "and activations first and refuses a configuration over it. 0 = the device's free memory.",
        range=(0.0, 4096.0),
    ),
    "csm_slots": Spec(int, CONFIGURE, "Context synopsis memory size (k-means centroids).", range=(1, 1024)),
    "dam_frames": Spec(
        int,
        CONFIGURE,
        "Detail Augmentation Memory size (full-resolution frames); at most csm_slots.",
        range=(0, 1024),
    ),
    "memory_fps": Spec(
        float,
        CONFIGURE,
        "Frames per second of stream time taken into memory; 0 = every frame.",
        range=(0.0, 240.0),
        positive_min=0.001,
    ),
    "frames_per_slot": Spec(
        int,
        CONFIGURE,
        "Sampled frames per memory slot: 2 = two consecutive frames in one Qwen2-VL temporal patch, "
        "as the checkpoint was trained; 1 = each frame alone. Questions see whole slots only.",
        range=(1, 2),
    ),
    "queue_size": Spec(
        int,
        CONFIGURE,
        "Sampled frames waiting for the vision encoder; the oldest is dropped when full.",
        range=(1, 1024),
    ),
    # questions and summaries
    "max_question_chars": Spec(int, CONFIGURE, "Longer questions are refused.", range=(1, 100000)),
    "max_pending_questions": Spec(
        int,
        CONFIGURE,
        "Questions waiting for an answer at once; more are refused at once with a 'busy' error.",
        range=(1, 64),
    ),
    "max_new_tokens": Spec(
        int, CONFIGURE, "Answer length limit; Ask requests asking for more are clamped.", range=(1, 4096)
    ),
    "default_timeout_s": Spec(
        float, CONFIGURE, "Ask timeout used when a request gives timeout_s = 0.", range=(0.1, 3600.0)
    ),
    "system_prompt": Spec(str, CONFIGURE, "System prompt placed before the memory."),
    "prefix_refresh_s": Spec(
        float,
        CONFIGURE,
        "Rebuild the cached memory prefix (one LLM pass over the "
        "memory) at most this often (wall clock) while memory changes.",
        range=(0.0, 3600.0),
    ),
    "max_prefix_lag_s": Spec(
        float,
        CONFIGURE,
        "Keep the cached prefix within this many stream seconds of the "
        "newest memory; a question within it (twice it while a rebuild runs) "
        "does not wait, else it waits for a prefix of its memory; "
        "0 = every question waits for a prefix of the newest memory.",
        range=(0.0, 3600.0),
    ),
    "summary_period_s": Spec(
        float,
        CONFIGURE,
        "Publish ~/scene_summary at most this often (wall clock), "
        "when new frames arrived since the last one; 0 = off.",
        range=(0.0, 86400.0),
        positive_min=0.1,
    ),
    "summary_prompt": Spec(str, CONFIGURE, "Question asked for each scene summary."),
    "evidence_frames": Spec(
        int,
        CONFIGURE,
        "Evidence items per answer and per ~/events message: the memory frames / centroids the "
        "answer (the condition's evaluation) attended to most; 0 = no evidence (not measured).",
        range=(0, 64),
    ),
    "thumbnail_side": Spec(
        int,
        CONFIGURE,
        "Longest side (pixels) of the thumbnails kept for the frames the memory retains "
        "(evidence images, ~/memory_view); 0 = none.",
        range=(0, 1024),
    ),
    "memory_view_period_s": Spec(
        float,
        CONFIGURE,
        "Publish ~/memory_view (a picture of the memory) at most this often, and never more than once "
        "a second, while memory changes; 0 = off.",
        range=(0.0, 3600.0),
    ),
    "summary_max_new_tokens": Spec(int, CONFIGURE, "Scene summary length limit.", range=(1, 4096)),
    # standing queries (~/watch, ~/events)
    "watch_max_conditions": Spec(
        int,
        CONFIGURE,
        "Conditions ~/watch accepts at most; all are evaluated in one batched prefill per memory update.",
        range=(1, 256),
    ),
    "watch_hysteresis": Spec(
        float,
        CONFIGURE,
        "A risen condition falls when P(yes) < its threshold minus this margin (it rises at >= threshold).",
        range=(0.0, 0.99),
    ),
    "watch_event_images": Spec(
        bool,
        CONFIGURE,
        "Each ~/events message also carries a JPEG thumbnail of each evidence item (evidence_images); "
        "needs evidence_frames > 0 and thumbnail_side > 0 to hold any image.",
    ),
    "diagnostics_period_s": Spec(float, CONFIGURE, "Period of the /diagnostics status.", range=(0.1, 60.0)),
}


def load_defaults(path: Optional[Path] = None) -> dict:
    """Default values from the params file; it must hold exactly the parameters in SPECS."""
    path = path or defaults_file()
    doc = yaml.safe_load(Path(path).read_text())
    values = doc["/**"]["ros__parameters"]
    if set(values) != set(SPECS):
        missing, unknown = sorted(set(SPECS) - set(values)), sorted(set(values) - set(SPECS))
        raise RuntimeError(
            f"{path} does not match fvs_ros.ros.params.SPECS: missing {missing}, unknown {unknown}"
        )
    return {name: SPECS[name].type(value) for name, value in values.items()}


# Per camera (cameras.<name>.<setting>): '' = derived from the camera's name / the node-wide value.
CAMERA_SPECS = {
    "image_topic": Spec(
        str,
        ACTIVATE,
        "This camera's image topic (relative names follow the node namespace; fully qualified ones, "
        "e.g. /robot2/front/image_raw, do not); empty: <camera name>/image_raw.",
    ),
    "image_transport": Spec(
        str,
        ACTIVATE,
        "This camera's transport; empty: the node's image_transport.",
        ("", "raw", "compressed"),
    ),
    "reliability": Spec(
        str,
        ACTIVATE,
        "This camera's reliability; empty: the node's reliability.",
        ("", "best_effort", "reliable"),
    ),
}


@dataclass(frozen=True)
class CameraSettings:
    """One camera's image input, resolved (no empty values)."""

    name: str  # '' = the single camera of a node without `cameras`
    image_topic: str
    image_transport: str
    reliability: str


def declare(node) -> None:
    """Declare every parameter on `node`, defaults from the YAML file. An empty list is declared
    by type alone (rclpy would type a [] value as a byte array; ROS params files and `-p x:=[]`
    leave such a parameter unset): read() takes it as []."""
    defaults = load_defaults()
    node.declare_parameters(
        "",
        [
            (
                name,
                Parameter.Type.STRING_ARRAY if defaults[name] == [] else defaults[name],
                spec.descriptor(name),
            )
            for name, spec in SPECS.items()
        ],
    )


def check_cameras(names) -> list[str]:
    """The camera names, checked (ValueError: empty, malformed or repeated)."""
    names = list(names)
    for name in names:
        if not _CAMERA_NAME.fullmatch(name):
            raise ValueError(
                f"camera name {name!r} must start with a letter and hold only letters, digits and '_' "
                "(it names parameters, topics and a memory_file subdirectory)"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"camera names must be unique: {', '.join(repeated)} repeated")
    return names


def cameras(node, values: dict) -> list[CameraSettings]:
    """The cameras' settings from `values` (read()) and their cameras.<name>.* parameters, which
    are declared here (with descriptors) if not yet: values given in a params file or on the
    command line apply. No `cameras`: the single unnamed camera on image_topic."""
    names = check_cameras(values["cameras"])
    if not names:
        return [CameraSettings("", values["image_topic"], values["image_transport"], values["reliability"])]
    out = []
    for name in names:
        own = {}
        for setting, spec in CAMERA_SPECS.items():
            full = f"cameras.{name}.{setting}"
            if not node.has_parameter(full):
                node.declare_parameter(full, "", spec.descriptor(full))
            own[setting] = node.get_parameter(full).value
            error = spec.check(own[setting])
            if error:
                raise ValueError(f"parameter {full}: {error}")
        out.append(
            CameraSettings(
                name,
                own["image_topic"] or f"{name}/image_raw",
                own["image_transport"] or values["image_transport"],
                own["reliability"] or values["reliability"],
            )
        )
    return out


def _spec(name: str) -> Optional[Spec]:
    """The Spec of a node parameter or of a camera's (cameras.<name>.<setting>)."""
    if name in SPECS:
        return SPECS[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "cameras":
        return CAMERA_SPECS.get(parts[2])
    return None


def check_change(name: str, value, state: str) -> Optional[str]:
    """Why setting `name` to `value` in lifecycle `state` is refused, or None if allowed."""
    spec = _spec(name)
    if spec is None:
        return None
    locked = {CONFIGURE: ("inactive", "active"), ACTIVATE: ("active",)}[spec.applies]
    if state in locked:
        return (
            f"{name} applies at {spec.applies}: change it while the node is "
            f"{'unconfigured' if spec.applies == CONFIGURE else 'inactive'}"
        )
    return spec.check(value)


def check_together(values: dict) -> None:
    """ValueError when parameters that are each valid contradict each other."""
    if values["dam_frames"] > values["csm_slots"]:
        raise ValueError(
            f"dam_frames ({values['dam_frames']}) must be at most csm_slots ({values['csm_slots']}): "
            "detail frames are picked one per heaviest centroid"
        )
    if values["summary_period_s"] > 0 and not values["summary_prompt"].strip():
        raise ValueError("summary_prompt is empty while summary_period_s > 0")


def _value(node, name: str):
    try:
        value = node.get_parameter(name).value
    except ParameterUninitializedException:  # a list declared empty (see declare)
        return []
    return list(value or []) if SPECS[name].type is list else value


def read(node) -> dict:
    """Current values of every parameter, checked against their choices."""
    values = {name: _value(node, name) for name in SPECS}
    for name, value in values.items():
        error = SPECS[name].check(value)
        if error:
            raise ValueError(f"parameter {name}: {error}")
    return values
