"""Fixtures: a real `sigil server` process on loopback, in a temp dir; a real `sigil agent`;
a real `sigil proxy` in agent mode in front of plain-HTTP upstreams, and client workloads
whose SVIDs come from the agent."""
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

TD = "interop.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sigil:
    def __init__(self, root: Path, port: int = 0, config: str = ""):
        """`config`: TOML text for a configuration file (`--config`), for the keys that have
        no flag (e.g. `[[external_issuers]]`)."""
        self.bin = os.environ["SIGIL_BIN"]
        self.root = root
        self.dir = root / "server"
        self.port = port or free_port()
        self.socket = self.dir / "admin.sock"
        self.config = None
        if config:
            self.config = root / "server.toml"
            self.config.write_text(config)
        self.start()

    def start(self):
        root = self.root
        self.log = open(root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [self.bin, "server", "--trust-domain", TD, "--data-dir", str(self.dir),
             "--listen-addr", f"127.0.0.1:{self.port}",
             *(["--config", str(self.config)] if self.config else [])],
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

    def __init__(self, server: Sigil, root: Path, extra=()):
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
                     "--trust-bundle", str(bundle), *extra]
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


class Broker:
    """A real Mosquitto MQTT broker of this test's own, on a free loopback port."""

    def __init__(self, root: Path):
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None)
        assert exe, "mosquitto is required (scripts/test installs it)"
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        conf = root / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmessage_size_limit 300000\n")
        self.log_path = root / "mosquitto.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.time() + 10
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "mosquitto did not start"
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
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


def register(server: Sigil, agent: Agent, name: str, groups=(), scopes=(), dns=(),
             enforcer=False) -> str:
    """A registration entry under `agent` for this test process's uid; returns the SPIFFE ID.
    `enforcer=True` for a proxy's entry: only then may it watch the agent's Enforcer API."""
    spiffe_id = f"spiffe://{TD}/{name}"
    args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent.node_id,
            "--selector", f"unix:uid:{os.getuid()}"]
    for flag, values in (("--group", groups), ("--scope", scopes), ("--dns", dns)):
        for v in values:
            args += [flag, v]
    if enforcer:
        args.append("--enforcer")
    server.admin(*args)
    return spiffe_id


class Workload:
    """A client workload: its X.509-SVID (picked by SPIFFE ID, since this process is
    registered under several) and bundle fetched from the agent with the pinned `spiffe`
    package, written as PEM files, an mTLS `ssl.SSLContext`, and access tokens."""

    def __init__(self, server: Sigil, agent: Agent, root: Path, spiffe_id: str):
        self.server = server
        self.spiffe_id = spiffe_id
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
            def mine():
                return next((s for s in client.fetch_x509_svids()
                             if str(s.spiffe_id) == spiffe_id), None)
            svid = wait_for(mine, 20, f"the X.509-SVID of {spiffe_id}")
            bundles = client.fetch_x509_bundles()
        d = root / ("workload-" + spiffe_id.rsplit("/", 1)[-1])
        d.mkdir(parents=True, exist_ok=True)
        self.cert = d / "svid.pem"
        self.key = d / "key.pem"
        self.bundle = d / "bundle.pem"
        pem = serialization.Encoding.PEM
        self.cert.write_bytes(b"".join(c.public_bytes(pem) for c in svid.cert_chain))
        self.key.write_bytes(svid.private_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.key.chmod(0o600)
        self.bundle.write_bytes(b"".join(
            a.public_bytes(pem) for b in bundles.bundles for a in b.x509_authorities))
        self.ctx = self.ssl_context()

    def ssl_context(self):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(cafile=str(self.bundle))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def token(self, resource: str = "model-gw", **extra) -> str:
        """A certificate-bound access token (client_credentials over mTLS, RFC 8705)."""
        with httpx.Client(verify=self.ctx, timeout=10) as c:
            r = c.post(self.server.url + "/oauth2/token",
                       data={"grant_type": "client_credentials", "resource": resource, **extra})
        assert r.status_code == 200, r.text
        return r.json()["access_token"]


    def exchange(self, subject_token: str, resource: str, **extra) -> httpx.Response:
        """RFC 8693 token exchange over mTLS: this workload acts for `subject_token`'s user."""
        with httpx.Client(verify=self.ctx, timeout=10) as c:
            return c.post(self.server.url + "/oauth2/token", data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": subject_token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "resource": resource, **extra})


class Proxy:
    """A real `sigil proxy` process in agent mode: its serving SVID (`spiffe_id`, an entry with
    `--dns localhost` and `--enforcer`) and the bundles come from the agent's Workload API,
    the revocations from its Enforcer API."""

    def __init__(self, server: Sigil, agent: Agent, root: Path, upstream: str, policy: str,
                 spiffe_id: str = f"spiffe://{TD}/proxy", mcp_path=None, extra=()):
        self.bin = server.bin
        self.port = free_port()
        self.url = f"https://localhost:{self.port}"
        self.dir = root / "proxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy_dir = self.dir / "policies"
        self.policy_dir.mkdir(exist_ok=True)
        (self.policy_dir / "test.cedar").write_text(policy)
        self.audit_log = self.dir / "audit.log"
        self.log_path = self.dir / "proxy.log"
        args = [self.bin, "proxy", "--trust-domain", TD, "--listen", f"127.0.0.1:{self.port}",
                "--upstream", upstream, "--audience", "model-gw", "--issuer", server.url,
                "--workload-api-socket", agent.endpoint, "--spiffe-id", spiffe_id,
                "--policy-dir", str(self.policy_dir), "--audit-log", str(self.audit_log)]
        if mcp_path:
            args += ["--mcp-path", mcp_path]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_ready(self, ctx, timeout: float = 30):
        """Until a TLS handshake with `ctx` succeeds (the proxy has its SVID from the agent)."""
        def handshake():
            assert self.proc.poll() is None, self.log_path.read_text()
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                with ctx.wrap_socket(s, server_hostname="localhost"):
                    return True
        try:
            wait_for(handshake, timeout, "the proxy to serve TLS")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- proxy log ---\n{self.log_path.read_text()}") from None

    def audit(self) -> list:
        if not self.audit_log.exists():
            return []
        # The segment: a header line, then `<len hex8> <crc32c hex8> <json>` lines, then zeros.
        # `sigil audit show` verifies each record's CRC and prints the JSON.
        out = subprocess.run([self.bin, "audit", "show", str(self.audit_log)],
                             capture_output=True, text=True, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


class Upstream:
    """A plain-HTTP upstream process (`sigil demo-model`, the MCP server, ...) on `port`."""

    def __init__(self, args, port: int, log_path: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while True:
            assert self.proc.poll() is None, log_path.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"{args[:2]} did not start: {log_path.read_text()}"
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


def demo_model(server: Sigil, root: Path) -> Upstream:
    """`sigil demo-model` on a free loopback port."""
    port = free_port()
    return Upstream([server.bin, "demo-model", "--listen", f"127.0.0.1:{port}"], port,
                    root / "demo-model.log")


def mcp_server(root: Path, calls: Path, json_response: bool, stateless: bool = False) -> Upstream:
    """tests/interop/mcp_server.py (the pinned `mcp` package) on a free loopback port."""
    port = free_port()
    args = [sys.executable, str(Path(__file__).with_name("mcp_server.py")), "--port", str(port),
            "--calls", str(calls)]
    if json_response:
        args.append("--json-response")
    if stateless:
        args.append("--stateless")
    return Upstream(args, port, root / "mcp-server.log")


IDP_DIR = Path(__file__).with_name("idp")


class IdP:
    """A real OpenID provider: tests/interop/idp/provider.js (the npm package `oidc-provider`)
    run by Node on a free loopback port. `user_token` logs a user in through its own login and
    consent pages (authorization code flow, as a browser would) and returns the JWT access
    token the provider mints."""

    CLIENT = ("console", "console-secret")
    REDIRECT = "http://127.0.0.1/callback"

    def __init__(self, root: Path):
        assert (IDP_DIR / "node_modules" / "oidc-provider").exists(), \
            "run `npm ci --prefix tests/interop/idp` (scripts/test does)"
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.jwks_uri = f"{self.issuer}/jwks"
        self.log_path = root / f"idp-{self.port}.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["node", str(IDP_DIR / "provider.js"), str(self.port)],
                                     stdout=self.log, stderr=self.log)
        def up():
            assert self.proc.poll() is None, self.log_path.read_text()
            return httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=1).status_code == 200
        wait_for(up, 30, "the OpenID provider")

    def user_token(self, user: str, scope: str = "openid tool:call tool:list",
                   resource: str = "urn:sigil") -> str:
        import re
        from html import unescape
        from urllib.parse import parse_qs, urljoin, urlparse
        with httpx.Client(timeout=10, follow_redirects=False) as c:
            r = c.get(f"{self.issuer}/auth", params={
                "client_id": self.CLIENT[0], "response_type": "code", "scope": scope,
                "redirect_uri": self.REDIRECT, "resource": resource, "state": "s1"})
            code = None
            for _ in range(20):
                if r.status_code in (302, 303):
                    loc = urljoin(str(r.url), r.headers["location"])
                    if loc.startswith(self.REDIRECT):
                        q = parse_qs(urlparse(loc).query)
                        assert "code" in q, loc
                        code = q["code"][0]
                        break
                    r = c.get(loc)
                    continue
                assert r.status_code == 200, (r.status_code, r.text)
                # A login or consent page of the provider's dev interactions: fill the form.
                action = unescape(re.search(r'<form[^>]*action="([^"]+)"', r.text).group(1))
                fields = {unescape(n): unescape(v) for n, v in re.findall(
                    r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', r.text)}
                if 'name="login"' in r.text:
                    fields.update({"login": user, "password": "any"})
                r = c.post(urljoin(str(r.url), action), data=fields)
            assert code, "no authorization code"
            t = c.post(f"{self.issuer}/token", auth=self.CLIENT, data={
                "grant_type": "authorization_code", "code": code,
                "redirect_uri": self.REDIRECT, "resource": resource})
            assert t.status_code == 200, t.text
            return t.json()["access_token"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture()
def idp(tmp_path):
    p = IdP(tmp_path)
    yield p
    p.stop()
