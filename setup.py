"""The fvs_ros Python package: modules, console scripts, launch and config files.

Both routes use this file. The pip route installs it (`pip install -e .`, scripts/setup_venv.sh),
console scripts into the environment's bin/ (an editable install skips data_files: CMake
installs launch and config there). The colcon route (CMakeLists.txt, ament_cmake: the package
also generates its interfaces, which only ament_cmake can) installs the modules. On both,
CMakeLists.txt generates the `ros2 run fvs_ros NAME` executables (lib/fvs_ros/NAME) from
CONSOLE_SCRIPTS below, so the list of commands is written once. Python dependencies:
requirements*.txt (ROS 2 parts come from a ROS install or the ros-* wheels, which pin one
distribution, so none are named here).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "fvs_ros"
ROOT = Path(__file__).resolve().parent
# One per line, "name = module:function": CMakeLists.txt reads these lines.
CONSOLE_SCRIPTS = [
    "fvs_node = fvs_ros.ros.node:main",
    "fvs_ask = fvs_ros.cli.ask:main",
    "fvs_video_source = fvs_ros.cli.video_source:main",
    "fvs_evaluate = fvs_ros.bag.evaluate:main",
    "fvs_bag_convert = fvs_ros.bag.convert:main",
    "fvs_bag_play = fvs_ros.bag.play:main",
    "fvs_watch = fvs_ros.cli.watch:main",
    "fvs_mcp = fvs_ros.cli.mcp.server:main",
]


def package_xml(tag: str) -> str:
    """A field of package.xml, the version's one source."""
    return re.search(rf"<{tag}>\s*(.*?)\s*</{tag}>", (ROOT / "package.xml").read_text(), re.S).group(1)


setup(
    name=PACKAGE,
    version=package_xml("version"),
    description="Flash-VStream for ROS 2: a perception node that answers questions about its camera stream",
    license=package_xml("license"),
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={f"{PACKAGE}.model": ["tiny_tokenizer/*"]},
    data_files=[
        (f"share/{PACKAGE}/launch", ["launch/stream.launch.py"]),
        (f"share/{PACKAGE}/config", ["config/fvs.yaml"]),
    ],
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    zip_safe=False,
)
