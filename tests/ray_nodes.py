"""A multi-node Ray cluster on 127.0.0.1 for tests: a head and nodes started with ``ray start
--block``, token auth for every process, every port a fresh free one, the session in its own
``--temp-dir`` (a short one under /tmp, removed by ``stop()``: Ray's socket paths are limited to
107 bytes, which pytest-xdist's per-worker base temp can pass), so
``/tmp/ray/ray_current_cluster`` and any Ray of the user's are left as they were. ``stop()`` stops
only the processes started here (SIGINT makes each tear down its own daemons; never ``ray stop``).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


# Below Linux's ephemeral range (32768-60999): a port found free there can be taken by any
# outgoing connection before the node binds it (a raylet whose agent's port is taken exits).
# Ray's own default worker ports are 10002-19999.
PORT_LO, PORT_HI = 20000, 32000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalCluster:
    def __init__(self, log_dir: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="r2fn-", dir="/tmp")
        self.log_dir = Path(log_dir)
        self.taken: set[int] = set()
        self.gcs, self.client = self._ports(2)
        self.address = f"127.0.0.1:{self.gcs}"
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []

    # -- ports
    def _ports(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            p = random.randint(PORT_LO, PORT_HI)
            if p not in self.taken and _port_free(p):
                out.append(p)
                self.taken.add(p)
        return out

    def _range(self, width: int) -> tuple[int, int]:
        while True:
            base = random.randint(PORT_LO, PORT_HI - width)
            span = set(range(base, base + width))
            if not span & self.taken and all(_port_free(p) for p in range(base, base + width, 7)):
                self.taken |= span
                return base, base + width - 1

    def _node_args(self, cpus: int, resources: dict | None) -> list[str]:
        manager, objects, agent, agent_grpc, metrics, runtime_env = self._ports(6)
        lo, hi = self._range(40)
        args = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                "--object-store-memory", str(150 * 1024 * 1024),
                "--node-manager-port", str(manager), "--object-manager-port", str(objects),
                "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
                "--min-worker-port", str(lo), "--max-worker-port", str(hi), "--temp-dir", self.temp_dir,
                "--disable-usage-stats", "--block"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        return args

    # -- nodes
    def _start(self, cmd: list[str]) -> None:
        log = open(self.log_dir / f"node{len(self.procs)}.log", "wb")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        self.wait_nodes(len(self.procs))

    def start_head(self, cpus: int = 2, resources: dict | None = None) -> LocalCluster:
        self._start([RAY, "start", "--head", "--port", str(self.gcs), "--ray-client-server-port", str(self.client),
                     "--include-dashboard", "false", *self._node_args(cpus, resources)])
        return self

    def add_node(self, cpus: int = 2, resources: dict | None = None, tries: int = 2) -> None:
        """Join one node. Ray gives a joining raylet a fixed 30 s to register; on a loaded 2-core
        machine (a job already running on the head) that can pass, and the ``ray start`` exits:
        then it is started again, with fresh ports."""
        for attempt in range(tries):
            try:
                self._start([RAY, "start", "--address", self.address, *self._node_args(cpus, resources)])
                return
            except AssertionError:
                if attempt + 1 == tries or self.procs[-1].poll() is None:
                    raise
                self.procs.pop()  # exited: nothing of it to stop

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        """Wait until ``n`` nodes are alive. Each probe is a subprocess with its own time limit (a
        ``ray.init`` against a head that died during start-up can hang for many minutes), and a
        ``ray start --block`` process that already exited fails the wait at once."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        err = ""
        while time.time() < deadline:
            dead = [p.args[:3] for p in self.procs if p.poll() is not None]
            if dead:
                raise AssertionError(f"`ray start` exited during start-up (see {self.log_dir}/node*.log): {dead}")
            try:
                out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                                     text=True, timeout=max(5.0, min(60.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                err = "probe timed out"
                continue
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            err = out.stderr[-2000:]
            time.sleep(2)
        raise AssertionError(f"Ray cluster at {self.address} did not reach {n} node(s): {err}")

    def stop(self, timeout: float = 10) -> None:
        """Stop the nodes started here (newest first); one that does not go within ``timeout`` is killed."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
