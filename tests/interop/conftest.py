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
    def __init__(self, root: Path):
        self.bin = os.environ["SIGIL_BIN"]
        self.dir = root / "server"
        self.port = free_port()
        self.socket = self.dir / "admin.sock"
        self.log = open(root / "server.log", "wb")
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

    def admin(self, *args: str) -> dict:
        out = subprocess.run([self.bin, *args, "--socket", str(self.socket), "--output", "json"],
                             capture_output=True, check=True)
        return json.loads(out.stdout)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture()
def sigil(tmp_path):
    s = Sigil(tmp_path)
    yield s
    s.stop()
