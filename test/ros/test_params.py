"""fvs_ros.ros.params: values that cannot work are refused when set, with the reason (issue 24 item
16); the node applies these checks to every parameter set call (test_node_robustness.py checks
them over DDS)."""

import math

import pytest

from fvs_ros.ros import params


@pytest.mark.parametrize(
    "value,why",
    [
        ("", "must not be empty"),
        ("a b", "must not contain characters"),
        ("image_raw/", "must not end with a forward slash"),
        ("1camera", "must not start with a number"),
    ],
)
def test_image_topic_must_be_a_ros_topic_name(value, why):
    reason = params.check_change("image_topic", value, "inactive")
    assert reason is not None and "is not a valid ROS topic name" in reason and why in reason, reason


@pytest.mark.parametrize("value", ["image_raw", "/camera/image_raw", "~/image", "cam_0/image_raw"])
def test_valid_topic_names_are_taken(value):
    assert params.check_change("image_topic", value, "inactive") is None


def test_rates_and_periods_where_0_means_something_refuse_tiny_positive_values():
    """memory_fps 1e-300 took one frame and then none for 1e300 s; a save or summary period of 1e-300
    (0 ns for the timer) would fire continuously. 0 keeps its meaning; tiny positives are refused."""
    tiny = {name: spec for name, spec in params.SPECS.items() if spec.positive_min is not None}
    assert set(tiny) == {"memory_fps", "save_period_s", "summary_period_s"}
    for name, spec in tiny.items():
        for value in (1e-300, spec.positive_min / 2):
            reason = params.check_change(name, value, "unconfigured")
            assert reason is not None and "too small to work" in reason, (name, value)
        for value in (0.0, spec.positive_min, spec.range[1]):
            assert params.check_change(name, value, "unconfigured") is None, (name, value)
        assert f"0 or at least {spec.positive_min:g}" in spec.descriptor(name).additional_constraints


def test_every_float_parameter_has_a_finite_range():
    """rclpy enforces the declared range at set time (NaN and inf fail it): every float has one."""
    for name, spec in params.SPECS.items():
        if spec.type is float:
            low, high = spec.range
            assert math.isfinite(low) and math.isfinite(high) and low >= 0, name
