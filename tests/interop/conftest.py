"""Fixtures: a real `sigil server` process on loopback, in a temp dir."""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

TD = "interop.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sigil:
    def __init__(self, root: Path, port: int = 0):
        self.bin = os.environ["SIGIL_BIN"]
        self.root = root
        self.dir = root / "server"
        self.port = port or free_port()
        self.socket = self.dir / "admin.sock"
        self.start()

    def start(self):
        root = self.root
        self.log = open(root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [self.bin, "server", "--trust-domain", TD, "--data-dir", str(self.dir),
             "--listen-addr", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while True:
            assert self.proc.poll() is None, (root / "server.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if self.socket.exists():
                    break
            except OSError:
                pass
            assert time.time() < deadline, "sigil server did not start"
            time.sleep(0.05)
        self.url = f"https://localhost:{self.port}"

    def bundle_pem(self) -> str:
        out = subprocess.run([self.bin, "bundle", "show", "--format", "pem", "--socket", str(self.socket)],
                             capture_output=True, check=True)
        return out.stdout.decode()

    def admin(self, *args: str) -> dict:
        out = subprocess.run([self.bin, *args, "--socket", str(self.socket), "--output", "json"],
                             capture_output=True, check=True)
        return json.loads(out.stdout)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()
        # Give the port back before a restart on the same port.
        time.sleep(0.2)


@pytest.fixture()
def sigil(tmp_path):
    s = Sigil(tmp_path)
    yield s
    s.stop()


class Agent:
    """A real `sigil agent` process attested to `server` with a fresh join token."""

    def __init__(self, server: Sigil, root: Path):
        self.bin = server.bin
        self.dir = root / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = root / "agent-sock" / "api.sock"
        bundle = root / "bootstrap.pem"
        bundle.write_text(server.bundle_pem())
        jt = server.admin("jointoken", "create")
        self.node_id = jt["node_id"]
        self.args = [self.bin, "agent", "--trust-domain", TD, "--server", f"127.0.0.1:{server.port}",
                     "--data-dir", str(self.dir), "--socket", str(self.socket),
                     "--trust-bundle", str(bundle)]
        self.log_path = root / "agent.log"
        self.start(["--join-token", jt["token"]])

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, extra=()):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.args, *extra], stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.time() < deadline, "agent did not start"
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def wait_for(fn, timeout: float, what: str):
    """Calls fn until it returns a truthy value (exceptions count as falsy)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")
