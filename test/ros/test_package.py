"""package.xml, setup.py, CMakeLists.txt, the code's imports and the installed tree agree (issues 2, 16)."""

import ast
import importlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from ament_index_python.packages import get_package_prefix, get_package_share_directory

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_XML = ET.parse(ROOT / "package.xml").getroot()
CMAKE = (ROOT / "CMakeLists.txt").read_text()
SETUP_PY = (ROOT / "setup.py").read_text()
NAME = PACKAGE_XML.findtext("name")
LAUNCH_FILE = ROOT / "launch" / "stream.launch.py"
PARAMS_FILE = ROOT / "config" / "fvs.yaml"

# Libraries a ROS install has from the OS: import name -> rosdep key.
ROSDEP_KEYS = {
    "numpy": "python3-numpy",
    "cv2": "python3-opencv",
    "yaml": "python3-yaml",
    "matplotlib": "python3-matplotlib",
    "pytest": "python3-pytest",
}
# Libraries with no rosdep key, installed from requirements-model.txt: import name -> pip name.
PIP_ONLY = {
    "torch": "torch",
    "triton": "torch",  # optional GPU kernels (model/quant_triton.py): CUDA builds of torch bring it
    "transformers": "transformers",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "rosbags": "rosbags",
    "mcap": "mcap",
    "mcap_ros2": "mcap-ros2-support",
    "simplejpeg": "simplejpeg",
    "mcp": "mcp",
    # fvs_mcp imports these parts of the MCP SDK's own stack; pip installs them with mcp
    "mcp_types": "mcp",
    "anyio": "mcp",
    "pydantic": "mcp",
    "uvicorn": "mcp",
    "httpx2": "mcp",  # the tests' HTTP client, the one the SDK's client uses
}


def interface_files():
    return [*ROOT.glob("msg/*.msg"), *ROOT.glob("srv/*.srv"), *ROOT.glob("action/*.action")]


def dependencies(*tags):
    return {element.text for tag in tags for element in PACKAGE_XML.findall(tag)}


def console_scripts():
    """setup.py's CONSOLE_SCRIPTS as {name: "module:function"}."""
    for node in ast.parse(SETUP_PY).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CONSOLE_SCRIPTS":
            entries = ast.literal_eval(node.value)
            return dict(re.fullmatch(r"(\w+) = ([\w.]+:\w+)", e).groups() for e in entries)
    raise AssertionError("no CONSOLE_SCRIPTS in setup.py")


def imports(*dirs):
    """Top-level names the Python files under `dirs` import, less the standard library, this
    package and the test directory's own modules."""
    local = {p.stem for p in (ROOT / "test").rglob("*.py")} | {p.name for p in (ROOT / "test").iterdir()}
    found = set()
    for d in dirs:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip":
                    found.add(node.args[0].value.split(".")[0])  # an optional (test) dependency
    return found - set(sys.stdlib_module_names) - {NAME} - local


def requirement_names():
    lines = (ROOT / "requirements-model.txt").read_text().splitlines()
    return {re.split(r"[<>=\[ ;]", line.strip())[0].lower() for line in lines if line and line[0].isalnum()}


def test_one_package_name_everywhere():
    assert PACKAGE_XML.get("format") == "3"
    assert NAME == "fvs_ros"
    assert re.search(r"^project\(\s*fvs_ros\b", CMAKE, re.M)
    assert re.search(r'^PACKAGE = "fvs_ros"$', SETUP_PY, re.M)
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


def test_every_import_is_a_declared_dependency():
    """What the package and its launch file import is in package.xml (ROS packages by name, OS
    libraries by rosdep key) or, with no rosdep key, in requirements-model.txt; what only the
    tests import may be a test_depend."""
    run = dependencies("depend", "exec_depend")
    test = run | dependencies("test_depend")
    pip = requirement_names()

    def missing(names, declared):
        out = []
        for name in sorted(names):
            if name in PIP_ONLY:
                if PIP_ONLY[name].lower() not in pip:
                    out.append(f"{name} (requirements-model.txt: {PIP_ONLY[name]})")
            elif ROSDEP_KEYS.get(name, name) not in declared:
                out.append(f"{name} (package.xml: {ROSDEP_KEYS.get(name, name)})")
        return out

    assert not missing(imports(NAME, "launch"), run), "undeclared run dependencies"
    assert not missing(imports("test"), test), "undeclared test dependencies"


def test_every_declared_dependency_is_used():
    """A ROS package in package.xml is imported, used by the interfaces, or a CMake dependency."""
    used = imports(NAME, "launch", "test") | set(re.findall(r"find_package\((\w+)", CMAKE))
    used |= set(re.search(r"DEPENDENCIES ([\w ]+)", CMAKE).group(1).split())
    used |= {"rosidl_default_runtime"}  # the generated interfaces' runtime
    declared = dependencies("depend", "exec_depend", "test_depend", "build_depend", "buildtool_depend")
    ros_packages = {d for d in declared if not d.startswith("python3-")}
    assert ros_packages <= used, ros_packages - used
    assert {
        ROSDEP_KEYS[n] for n in imports(NAME, "launch", "test") if n in ROSDEP_KEYS
    } == declared - ros_packages


def test_console_scripts_point_at_main_functions():
    scripts = console_scripts()
    assert {"fvs_node", "fvs_ask", "fvs_video_source", "fvs_evaluate"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    # the launch file starts executables this package installs
    for executable in re.findall(r"executable=\"(\w+)\"", LAUNCH_FILE.read_text()):
        assert executable in scripts, executable


def test_cmake_reads_every_console_script_from_setup_py():
    """CMakeLists.txt generates the `ros2 run` executables from the CONSOLE_SCRIPTS lines it matches
    with this pattern; an entry written otherwise would be missing from the colcon route."""
    pattern = re.search(r'file\(STRINGS setup\.py console_scripts REGEX "(.*)"\)', CMAKE).group(1)
    pattern = pattern.replace('\\"', '"')
    lines = [line for line in SETUP_PY.splitlines() if re.fullmatch(pattern, line)]
    assert len(lines) == len(console_scripts())
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in CMAKE


def test_installed_tree_matches_the_source():
    """The pip route's install: interfaces and package.xml (CMake), launch, config and console
    scripts (setup.py), all in one prefix."""
    share = Path(get_package_share_directory(NAME))
    prefix = Path(get_package_prefix(NAME))
    assert (share / "package.xml").read_text() == (ROOT / "package.xml").read_text()
    assert (share / "launch" / LAUNCH_FILE.name).read_text() == LAUNCH_FILE.read_text()
    assert (share / "config" / PARAMS_FILE.name).read_text() == PARAMS_FILE.read_text()
    for name in console_scripts():
        in_bin, in_lib = prefix / "bin" / name, prefix / "lib" / NAME / name
        assert os.access(in_bin, os.X_OK) or os.access(in_lib, os.X_OK), name


def test_ros2_run_executables_are_installed_and_run():
    """`ros2 run` and `ros2 launch` look for an executable in <prefix>/lib/<package>/ (the colcon
    route and the pip route alike, issue 24): every console script is there and starts."""
    lib = Path(get_package_prefix(NAME)) / "lib" / NAME
    for name in console_scripts():
        assert os.access(lib / name, os.X_OK), f"{lib / name} is missing or not executable"
    run = subprocess.run([str(lib / "fvs_ask"), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: fvs_ask" in run.stdout, run.stdout + run.stderr
