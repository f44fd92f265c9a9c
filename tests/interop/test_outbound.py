"""The caller's side: unmodified clients (the pinned `openai` package with only `base_url` and a
dummy API key, `curl`) call a model through two real sidecars. Agent A's `sigil proxy` runs an
outbound listener (plain HTTP, A's uid only) and adds A's identity: its SVID from the agent,
an access token from `sigil server`, mTLS to the callee's sidecar whose exact SPIFFE ID it
requires, and egress policy on A's own device. B's sidecar (the inbound proxy) sees A's
SPIFFE ID and decides with its own policy. A recording upstream proves what arrived.
"""
import json
import os
import subprocess
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import (TD, Agent, Proxy, Sigil, Upstream, Workload, free_port, register,
                      wait_for)

CALLER = f"spiffe://{TD}/floor/agent-a"
PROXY = f"spiffe://{TD}/proxy"
DUMMY_KEY = "sk-dummy-key-that-must-never-leave-the-device"

# B's side: who may invoke what (A by its group, as the inbound sidecar sees it).
POLICY_B = """
@id("floor-invoke")
permit (principal in Group::"factory-floor", action == Action::"invoke",
        resource == Model::"defect-detector");
@id("list")
permit (principal, action == Action::"list_models", resource);
"""

# A's side (egress): the routes A may use, and what it may call on them.
POLICY_A = """
@id("egress-model-b")
permit (principal in Group::"factory-floor", action == Action::"egress", resource)
when { resource == Route::"model-b" || resource == Route::"imposter" };
@id("a-invoke")
permit (principal in Group::"factory-floor", action == Action::"invoke",
        resource == Model::"defect-detector");
@id("a-list")
permit (principal, action == Action::"list_models", resource);
"""


class Outbound:
    """A real `sigil proxy` process with only an `[outbound]` section (the caller's side)."""

    def __init__(self, server: Sigil, agent: Agent, root: Path, spiffe_id: str, policy: str,
                 routes: str, socket_path: Path | None = None):
        self.bin = server.bin
        self.port = free_port()
        self.dir = root / "outbound"
        self.dir.mkdir(parents=True, exist_ok=True)
        pdir = self.dir / "policies"
        pdir.mkdir(exist_ok=True)
        (pdir / "egress.cedar").write_text(policy)
        self.audit_log = self.dir / "audit.log"
        self.log_path = self.dir / "outbound.log"
        sock = f'listen_socket = "{socket_path}"\n' if socket_path else ""
        cfg = self.dir / "outbound.toml"
        cfg.write_text(
            f'trust_domain = "{TD}"\nissuer = "{server.url}"\n'
            f'workload_api_socket = "{agent.endpoint}"\nspiffe_id = "{spiffe_id}"\n'
            f'policy_dir = "{pdir}"\naudit_log = "{self.audit_log}"\n'
            f'[outbound]\nlisten_addr = "127.0.0.1:{self.port}"\n{sock}{routes}')
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.bin, "proxy", "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30):
        def up():
            assert self.proc.poll() is None, self.log_path.read_text()
            return httpx.get(self.url + "/v1/models", timeout=5).status_code == 200
        try:
            wait_for(up, timeout, "the outbound listener to answer")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- outbound log ---\n{self.log_path.read_text()}") from None

    def wait_listening(self, timeout: float = 30):
        """Until the listener accepts connections: it binds only once its credentials are
        loaded, so it serves from then on (for routes whose policy allows no GET probe)."""
        def up():
            assert self.proc.poll() is None, self.log_path.read_text()
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        wait_for(up, timeout, "the outbound listener to accept connections")

    def audit(self) -> list:
        if not self.audit_log.exists():
            return []
        out = subprocess.run([self.bin, "audit", "show", str(self.audit_log)],
                             capture_output=True, text=True, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


def recording_upstream(root: Path, record: Path) -> Upstream:
    port = free_port()
    return Upstream([sys.executable, str(Path(__file__).with_name("openai_upstream.py")),
                     "--port", str(port), "--record", str(record)], port, root / "upstream.log")


def routes(inbound_port: int) -> str:
    return (
        # The model's sidecar: chosen by the model the body names (or as the default).
        f'[[outbound.routes]]\nname = "model-b"\naddress = "127.0.0.1:{inbound_port}"\n'
        f'spiffe_id = "{PROXY}"\naudience = "model-gw"\nscope = "model:invoke model:list"\n'
        'models = ["defect-detector"]\ndefault = true\n'
        # The same address, but the sidecar there is not who this route expects.
        f'[[outbound.routes]]\nname = "imposter"\naddress = "127.0.0.1:{inbound_port}"\n'
        f'spiffe_id = "spiffe://{TD}/billing/proxy"\naudience = "model-gw"\n'
        'hosts = ["imposter"]\n'
        # A route A's egress policy does not let it use.
        f'[[outbound.routes]]\nname = "forbidden"\naddress = "127.0.0.1:{inbound_port}"\n'
        f'spiffe_id = "{PROXY}"\naudience = "model-gw"\nhosts = ["forbidden"]\n')


class Stack:
    def __init__(self, root: Path):
        self.server = Sigil(root)
        self.parts = []
        try:
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            # A's identity: its sidecar serves it (and watches revocations: an enforcer).
            register(self.server, self.agent, "floor/agent-a", groups=["factory-floor"],
                     scopes=["model:invoke", "model:list"], enforcer=True)
            self.record = root / "upstream-requests.jsonl"
            self.upstream = recording_upstream(root, self.record)
            self.parts.append(self.upstream)
            self.inbound = Proxy(self.server, self.agent, root, self.upstream.url, POLICY_B)
            self.parts.append(self.inbound)
            # Where another uid can reach it (pytest's own temp dirs are private).
            self.socket_dir = Path(tempfile.mkdtemp(prefix="sigil-outbound-"))
            self.socket_dir.chmod(0o755)
            self.socket = self.socket_dir / "out.sock"
            self.outbound = Outbound(self.server, self.agent, root, CALLER, POLICY_A,
                                     routes(self.inbound.port), socket_path=self.socket)
            self.parts.append(self.outbound)
            probe = Workload(self.server, self.agent, root, CALLER)
            self.inbound.wait_ready(probe.ctx)
            self.outbound.wait_ready()
        except BaseException:
            self.stop()
            raise

    def requests(self) -> list:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def stop(self):
        for p in reversed(self.parts):
            p.stop()
        self.server.stop()
        if hasattr(self, "socket_dir"):
            shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("outbound"))
    yield s
    s.stop()


def header(req: dict, name: str) -> list:
    return [v for k, v in req["headers"] if k.lower() == name]


def test_openai_with_only_base_url_calls_through_both_sidecars(stack):
    client = openai.OpenAI(base_url=stack.outbound.url + "/v1", api_key=DUMMY_KEY,
                           max_retries=0, timeout=20)
    before = len(stack.requests())
    done = client.chat.completions.create(
        model="defect-detector", messages=[{"role": "user", "content": "inspect part 7"}])
    assert done.choices[0].message.content == "part 7 has no defect"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="defect-detector", stream=True,
            messages=[{"role": "user", "content": "inspect part 7"}]))
    assert streamed == "part 7 has no defect"
    # The model list is what A may invoke (filtered by A's egress policy and B's policy).
    assert [m.id for m in client.models.list()] == ["defect-detector"]

    arrived = stack.requests()[before:]
    assert [r["path"] for r in arrived] == ["/v1/chat/completions"] * 2 + ["/v1/models"]
    for r in arrived:
        # B's sidecar set the caller's identity from A's certificate.
        assert header(r, "x-sigil-spiffe-id") == [CALLER], r["headers"]
        # The app's key went nowhere: not as Authorization, not anywhere else.
        assert DUMMY_KEY not in json.dumps(r), r
        assert header(r, "authorization") == []
    # B decided on A's identity, with A's route token; A audited its own egress.
    b = [x for x in stack.inbound.audit() if x["spiffe_id"] == CALLER]
    assert [x["decision"] for x in b[-3:]] == ["allow"] * 3
    a = stack.outbound.audit()[-3:]
    assert {(x["direction"], x["route"], x["decision"]) for x in a} == {
        ("outbound", "model-b", "allow")}
    assert [c["action"] for c in a[0]["calls"]] == ["egress", "invoke"]
    # The token B checked is the one A's sidecar obtained for the route.
    assert {x["jti"] for x in a} & {x["jti"] for x in b[-3:]}


def curl_as(uid: int | None, *args: str) -> subprocess.CompletedProcess:
    kw = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=30, **kw)


def status_and_body(out: subprocess.CompletedProcess) -> tuple[int, str]:
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_another_uid_cannot_borrow_the_identity(stack):
    assert os.getuid() == 0, "the test spawns a process as nobody"
    chat = ["-H", "content-type: application/json", "-d",
            '{"model":"defect-detector","messages":[{"role":"user","content":"x"}]}']
    before = len(stack.requests())
    for where in ([stack.outbound.url + "/v1/chat/completions"],
                  ["--unix-socket", str(stack.socket), "http://a/v1/chat/completions"]):
        out = curl_as(65534, *chat, *where)
        code, body = status_and_body(out)
        assert code == 403, (body, out.stderr)
        assert "uid 65534 may not use it" in json.loads(body)["error"]["message"]
        # The workload it serves (this uid) is served, on both listeners.
        code, body = status_and_body(curl_as(None, *chat, *where))
        assert code == 200, body
    assert len(stack.requests()) == before + 2


def test_a_callee_with_the_wrong_spiffe_id_is_refused(stack):
    before = len(stack.requests()), len(stack.inbound.audit())
    r = httpx.post(stack.outbound.url + "/v1/chat/completions", headers={"host": "imposter"},
                   json={"model": "defect-detector", "messages": []}, timeout=20)
    # The sidecar at that address has a valid SVID of the trust domain, but not the one the
    # route names: the handshake is refused by A's side.
    assert r.status_code == 502, r.text
    assert (len(stack.requests()), len(stack.inbound.audit())) == before
    last = stack.outbound.audit()[-1]
    assert (last["route"], last["decision"]) == ("imposter", "allow")


def test_egress_policy_refuses_before_anything_leaves(stack):
    before = len(stack.requests()), len(stack.inbound.audit())
    r = httpx.post(stack.outbound.url + "/v1/chat/completions", headers={"host": "forbidden"},
                   json={"model": "defect-detector", "messages": []}, timeout=20)
    assert r.status_code == 403, r.text
    assert 'egress on Route::"forbidden"' in r.json()["error"]["message"]
    # A model A may not invoke is refused on A's side too, on a permitted route.
    r = httpx.post(stack.outbound.url + "/v1/chat/completions",
                   json={"model": "secret-model", "messages": []}, timeout=20)
    assert r.status_code == 403, r.text
    assert 'invoke on Model::"secret-model"' in r.json()["error"]["message"]
    # Nothing reached B's sidecar (no decision there) or its upstream.
    assert (len(stack.requests()), len(stack.inbound.audit())) == before
    denied = stack.outbound.audit()[-2:]
    assert [(x["route"], x["decision"]) for x in denied] == [("forbidden", "deny"),
                                                            ("model-b", "deny")]


def test_a_revoked_caller_is_cut_off_within_a_second(tmp_path):
    s = Stack(tmp_path)
    try:
        client = httpx.Client(timeout=10)
        chat = {"model": "defect-detector", "messages": [{"role": "user", "content": "x"}]}
        assert client.post(s.outbound.url + "/v1/chat/completions", json=chat).status_code == 200
        s.server.admin("svid", "revoke", CALLER)
        revoked_at = time.monotonic()
        while True:
            try:
                r = client.post(s.outbound.url + "/v1/chat/completions", json=chat)
            except httpx.TransportError:
                # The sidecar closed the kept-alive connection of its revoked identity.
                break
            if r.status_code != 200:
                break
            assert time.monotonic() - revoked_at < 1.0, "still served 1 s after revocation"
            time.sleep(0.01)
        took = time.monotonic() - revoked_at
        assert took < 1.0, took
        # A new connection gets a clear refusal.
        r = httpx.post(s.outbound.url + "/v1/chat/completions", json=chat, timeout=10)
        assert r.status_code in (401, 403, 502), r.text
        print(f"first refused call {took * 1000:.0f} ms after `sigil svid revoke`")
    finally:
        s.stop()
