"""stream.launch.py under launch_testing: the node activates itself, watches the synthetic video
source and answers over ~/ask. Runs wherever launch_testing is importable and fvs_ros is installed
for launch (a colcon install, or the pip route's .venv: lib/fvs_ros/<command> and share/fvs_ros);
skipped, saying which, where either is missing (the ROS 2 wheels from PyPI have no launch):
test_launch_file.py and test_node.py cover the same path there.
"""

import os
import subprocess
import sys
import tempfile
import time
import unittest

import pytest
from ament_index_python.packages import PackageNotFoundError, get_package_prefix, get_package_share_directory

EXECUTABLES = ("fvs_node", "fvs_video_source")  # what stream.launch.py starts (with video:=synthetic)


def missing_install() -> str:
    """Why launch cannot start this package's nodes here, or '' when it can."""
    try:
        prefix, share = get_package_prefix("fvs_ros"), get_package_share_directory("fvs_ros")
    except (PackageNotFoundError, ValueError) as e:
        return f"fvs_ros is not in the ament index ({e}): build it with colcon or scripts/setup_venv.sh"
    wanted = [(os.path.join(share, "launch", "stream.launch.py"), os.R_OK)]
    wanted += [(os.path.join(prefix, "lib", "fvs_ros", name), os.X_OK) for name in EXECUTABLES]
    missing = [path for path, mode in wanted if not os.access(path, mode)]
    return f"fvs_ros is installed without {', '.join(missing)}: re-run its build" if missing else ""


pytest.importorskip(
    "launch_testing",
    reason="launch_testing is not installed (no ROS 2 launch here); "
    "test_launch_file.py checks the launch file and test_node.py the node instead",
)
if missing_install():
    pytest.skip(missing_install(), allow_module_level=True)

import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

import launch  # noqa: E402
from fvs_ros.cli.ask import wait_for_answers  # noqa: E402
from fvs_ros.srv import Ask  # noqa: E402

NAMESPACE = "fvs_launch_test"


@pytest.mark.launch_test
def generate_test_description():
    model = os.path.join(tempfile.mkdtemp(prefix="fvs_launch_test_"), "tiny")
    subprocess.run([sys.executable, "-m", "fvs_ros.model.tiny", model], check=True, capture_output=True)
    stream = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            os.path.join(get_package_share_directory("fvs_ros"), "launch", "stream.launch.py")
        ),
        launch_arguments={
            "model": model,
            "device": "cpu",
            "video": "synthetic",
            "namespace": NAMESPACE,
        }.items(),
    )
    return launch.LaunchDescription([stream, launch_testing.actions.ReadyToTest()])


class TestAsk(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("fvs_launch_test_client")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def ask(self, client):
        future = client.call_async(Ask.Request(question="What is happening?", timeout_s=30.0))
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=60.0)
        self.assertTrue(future.done(), "no response from ~/ask")
        return future.result()

    def test_the_activated_node_answers_from_the_video(self):
        client = self.node.create_client(Ask, f"/{NAMESPACE}/fvs/ask")
        self.assertTrue(wait_for_answers(self.node, client, 120.0), "the node never activated")
        deadline, response = time.monotonic() + 60.0, None
        while time.monotonic() < deadline:
            response = self.ask(client)
            if response.success and response.frames_seen >= 2:
                break
            time.sleep(1.0)
        self.assertTrue(response.success, response.error)
        self.assertGreaterEqual(response.frames_seen, 2)
        self.assertTrue(response.answer)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_processes_exit_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
