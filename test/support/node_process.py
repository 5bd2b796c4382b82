"""The fvs node as a separate process, for the tests that talk to it over DDS."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / "config" / "fvs.yaml"


class NodeProcess:
    """`python -m fvs_ros.ros.node --autostart` with the YAML params file; output in a log file."""

    def __init__(self, log_path: Path, name="fvs", namespace="", **parameters):
        self.log_path = log_path
        args = [
            sys.executable,
            "-m",
            "fvs_ros.ros.node",
            "--autostart",
            "--ros-args",
            "-r",
            f"__node:={name}",
            *(["-r", f"__ns:={namespace}"] if namespace else []),
            "--params-file",
            str(PARAMS_FILE),
        ]
        for name, value in parameters.items():
            args += ["-p", f"{name}:={value}"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def text(self) -> str:
        return self.log_path.read_text()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout=120) -> int:  # a loaded 2-core machine has taken over 30 s to shut down
        """SIGINT, then SIGKILL if the process has not ended within `timeout` s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
