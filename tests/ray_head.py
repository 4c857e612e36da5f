"""A real Ray head on 127.0.0.1 for tests that need the job server (``ray job submit``).

Every port is a fresh free one and the session lives in its own temp dir, so it cannot collide with
the session-wide local Ray or with other tests' clusters. Token authentication is on for the head,
the clients and ``ray job submit``. ``ray start --block`` runs in its own process group, which is
what gets stopped: only the processes this helper started, never ``ray stop``.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


class RayHead:
    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="r2fh-", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            # the job entrypoint's `python` must be the project's interpreter
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 90) -> RayHead:
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(self.gcs_port), "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
               "--object-store-memory", str(200 * 1024 * 1024),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--ray-client-server-port", str(free_port()), "--node-manager-port", str(free_port()),
               "--object-manager-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.log_tail()}")
            if self._job_api_ready():
                return self
            time.sleep(1.0)
        raise RuntimeError(f"Ray head did not come up in {timeout}s: {self.log_tail()}")

    def _job_api_ready(self) -> bool:
        import urllib.request

        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def ray_cli(self, *args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # leader of the session started above
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # the group may outlive its leader for a moment (raylet workers): give it the signal too
                time.sleep(1.0)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
