"""package.xml, CMakeLists.txt, the installed tree, launch and config files agree (issue 2)."""

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from ament_index_python.packages import get_package_prefix, get_package_share_directory

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_XML = ET.parse(ROOT / "package.xml").getroot()
CMAKE = (ROOT / "CMakeLists.txt").read_text()
NAME = PACKAGE_XML.findtext("name")
LAUNCH_FILE = ROOT / "launch" / "stream.launch.py"
PARAMS_FILE = ROOT / "config" / "fvs.yaml"


def programs():
    """Scripts that CMakeLists.txt installs to lib/fvs_ros (what `ros2 run fvs_ros ...` finds)."""
    found = re.search(r"install\(PROGRAMS\s+([^)]*?)\s+DESTINATION lib/\$\{PROJECT_NAME\}\)", CMAKE)
    assert found, "no install(PROGRAMS ... DESTINATION lib/${PROJECT_NAME})"
    return found.group(1).split()


def interface_files():
    return [*ROOT.glob("msg/*.msg"), *ROOT.glob("srv/*.srv"), *ROOT.glob("action/*.action")]


def dependencies(*tags):
    return {element.text for tag in tags for element in PACKAGE_XML.findall(tag)}


def test_one_package_name_everywhere():
    assert PACKAGE_XML.get("format") == "3"
    assert NAME == "fvs_ros"
    assert re.search(r"^project\(\s*fvs_ros\b", CMAKE, re.M)
    assert (ROOT / NAME / "__init__.py").is_file()
    assert PACKAGE_XML.findtext("export/build_type") == "ament_cmake"


def test_interfaces_declared_and_present():
    declared = re.findall(r'"((?:msg|srv|action)/\w+\.(?:msg|srv|action))"', CMAKE)
    on_disk = sorted(str(p.relative_to(ROOT)) for p in interface_files())
    assert sorted(declared) == on_disk
    assert on_disk == [
        "action/Ask.action",
        "msg/Evidence.msg",
        "msg/SceneSummary.msg",
        "msg/WatchEvaluation.msg",
        "msg/WatchEvent.msg",
        "srv/Ask.srv",
        "srv/Watch.srv",
    ]
    assert "rosidl_interface_packages" in {g.text for g in PACKAGE_XML.findall("member_of_group")}


def test_every_interface_field_is_commented():
    for path in interface_files():
        previous = ""
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#") and line.strip() != "---":
                assert previous.startswith("#"), f'{path.name}: field "{line}" has no comment above it'
            previous = line


def test_rosdep_keys_declared():
    run = dependencies("depend", "exec_depend")
    for key in (
        "rclpy",
        "sensor_msgs",
        "std_msgs",
        "std_srvs",
        "builtin_interfaces",
        "diagnostic_msgs",
        "cv_bridge",
        "launch_ros",
        "rosidl_default_runtime",
    ):
        assert key in run, key
    for key in ("launch_testing", "python3-pytest"):
        assert key in dependencies("test_depend"), key
    assert "rosidl_default_generators" in dependencies("buildtool_depend")


def test_install_rules_cover_launch_config_and_executables():
    assert re.search(r"install\(DIRECTORY launch config DESTINATION share/\$\{PROJECT_NAME\}\)", CMAKE)
    assert {"scripts/fvs_node", "scripts/fvs_ask", "scripts/fvs_watch"} <= set(programs())
    for script in programs():
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), script
        module = re.search(r"from (fvs_ros[\w.]*) import main", path.read_text()).group(1)
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert "def main(" in source, f"{module} has no main()"


def test_installed_tree_matches_the_source():
    share = Path(get_package_share_directory(NAME))
    prefix = Path(get_package_prefix(NAME))
    assert (share / "package.xml").read_text() == (ROOT / "package.xml").read_text()
    assert (share / "launch" / LAUNCH_FILE.name).read_text() == LAUNCH_FILE.read_text()
    assert (share / "config" / PARAMS_FILE.name).read_text() == PARAMS_FILE.read_text()
    for script in programs():
        executable = prefix / "lib" / NAME / Path(script).name
        assert os.access(executable, os.X_OK), executable


def test_launch_file_uses_the_params_file_and_package():
    source = LAUNCH_FILE.read_text()
    ast.parse(source)
    assert "generate_launch_description" in source
    assert f"'{NAME}'" in source or f'"{NAME}"' in source
    assert PARAMS_FILE.name in source
    assert "executable='fvs_node'" in source or 'executable="fvs_node"' in source


def test_params_file_names_the_launched_node():
    params = yaml.safe_load(PARAMS_FILE.read_text())
    (node_key,) = params
    assert "ros__parameters" in params[node_key]
    launched_names = re.findall(r"name=['\"](\w+)['\"]", LAUNCH_FILE.read_text())
    assert node_key == "/**" or node_key.split("/")[-1] in launched_names
