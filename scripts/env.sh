# Source me: puts the fvs_ros virtual environment (scripts/setup_venv.sh) on PATH and
# sets what the ROS 2 wheels need there. FVS_VENV picks the environment (default: .venv, or
# .venv-jazzy when FVS_ROS_DISTRO=jazzy).
_fvs_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${FVS_ROS_DISTRO:-kilted}" = jazzy ]; then _fvs_default=.venv-jazzy; else _fvs_default=.venv; fi
_fvs_venv=${FVS_VENV:-$_fvs_root/$_fvs_default}
export VIRTUAL_ENV=$_fvs_venv
export PATH=$_fvs_venv/bin:$PATH
# ament's resource index (get_package_share_directory) and CMake's package search.
export AMENT_PREFIX_PATH=$_fvs_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export CMAKE_PREFIX_PATH=$_fvs_venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
# Large images over Fast DDS between processes need the large-data transport.
export FASTDDS_BUILTIN_TRANSPORTS=${FASTDDS_BUILTIN_TRANSPORTS:-LARGE_DATA}
unset _fvs_root _fvs_venv _fvs_default
