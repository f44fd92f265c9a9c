"""Continuous verification with real processes and a real MQTT broker (Mosquitto): a node's
posture raises its risk, which reaches the `risk` claim of new tokens and, fresher, every
proxy's `context.risk`; behaviour telemetry from the proxies is scored, and a compromised
workload is quarantined (its SVIDs revoked, its live connections closed) while workloads on
other nodes keep working.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from conftest import (TD, Agent, Broker, Proxy, Sigil, Workload, demo_model, register,
                      wait_for)

def risk_policy(ceiling: int) -> str:
    """Invoke only while the caller's node scores at most `ceiling` (the machine's own
    baseline: a test machine may run things no ruleset knows, e.g. a sandbox's memfd)."""
    return f"""
@id("floor-invokes-when-risk-is-baseline")
permit (principal in Group::"factory-floor", action == Action::"invoke",
        resource == Model::"defect-detector")
when {{ context.risk.score <= {ceiling} }};

@id("anyone-lists-models")
permit (principal, action == Action::"list_models", resource);
"""


def payload(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def ruleset(path):
    """Every executable is known except those under /tmp (where the test puts its own)."""
    tops = sorted(f"/{d}/" for d in os.listdir("/") if d != "tmp")
    path.write_text(
        "[levels]\nmedium = 30\nhigh = 60\ncritical = 90\n"
        f"[executables]\nallow_path_prefixes = {json.dumps(tops)}\n"
        "unknown_score = 10\nmax_score = 100\n")
    return path


def chat(who: Workload, proxy: Proxy, token: str, model="defect-detector") -> httpx.Response:
    with httpx.Client(verify=who.ctx, timeout=10) as c:
        return c.post(f"{proxy.url}/v1/chat/completions",
                      headers={"Authorization": f"Bearer {token}"},
                      json={"model": model, "messages": [{"role": "user", "content": "frame 7"}]})


def risk_of(server: Sigil, node_id: str) -> dict:
    nodes = server.admin("node", "risk")["nodes"]
    return next((n for n in nodes if n["node_id"] == node_id), {})


def test_posture_raises_risk_and_policy_follows_both_ways(tmp_path):
    broker = Broker(tmp_path)
    server = Sigil(tmp_path, config=f'[telemetry]\nbroker = "{broker.url}"\n'
                                    "learning_windows = 3\nquarantine = false\n")
    parts = []
    try:
        rules = ruleset(tmp_path / "posture.toml")
        agent = Agent(server, tmp_path, extra=["--posture-rules", str(rules),
                                               "--posture-interval-secs", "1",
                                               "--telemetry-broker", broker.url])
        agent_started = time.time()
        parts.append(agent)
        # The node's own baseline: its first posture report, before anything of ours runs.
        base = wait_for(lambda: risk_of(server, agent.node_id), 20, "the first posture report")
        floor = base["score"]
        assert floor <= 80, base
        register(server, agent, "proxy", dns=["localhost"], enforcer=True)
        camera_id = register(server, agent, "floor/camera", groups=["factory-floor"])
        model = demo_model(server, tmp_path)
        parts.append(model)
        proxy = Proxy(server, agent, tmp_path, model.url, risk_policy(floor),
                      extra=["--telemetry-broker", broker.url, "--telemetry-window-secs", "1"])
        parts.append(proxy)
        camera = Workload(server, agent, tmp_path, camera_id)
        proxy.wait_ready(camera.ctx)

        # At its baseline (once the behaviour score of our own processes starting has
        # decayed), the node's risk is in the token, and the call passes.
        wait_for(lambda: risk_of(server, agent.node_id).get("score") == floor, 30,
                 "the node's risk to be its baseline")
        claim = payload(camera.token())["risk"]
        assert claim["score"] == floor and claim["node"] == agent.node_id, claim
        wait_for(lambda: chat(camera, proxy, camera.token()).status_code == 200, 20,
                 "the baseline-risk call to pass")
        token = camera.token()

        # The node's behaviour baseline takes its first 3 agent rounds (1 s each): the new
        # executable must come after it to be new to the detector.
        time.sleep(max(0.0, agent_started + 5 - time.time()))

        # An unknown executable starts: the posture score rises.
        miner = tmp_path / "miner"
        shutil.copy("/bin/sleep", miner)
        proc = subprocess.Popen([str(miner), "300"])
        try:
            r = wait_for(lambda: (lambda n: n if n.get("score", 0) > floor else None)(
                risk_of(server, agent.node_id)), 20, "the node's risk to rise")
            assert any(str(miner) in why for why in r["posture_reasons"]), r
            # The token issued before still says the old score, but the proxy has the
            # fresher table from its agent: refused.
            assert payload(token)["risk"]["score"] == floor
            wait_for(lambda: chat(camera, proxy, token).status_code == 403, 20,
                     "the proxy to refuse the token issued before the change")
            refused = chat(camera, proxy, token)
            assert refused.status_code == 403, refused.text
            assert "policy denies invoke" in refused.text, refused.text
            # A new token carries the raised risk.
            assert payload(camera.token())["risk"]["score"] > floor
            # The new executable also reached the server over MQTT as node telemetry.
            wait_for(lambda: any("miner" in why
                                 for why in risk_of(server, agent.node_id)["anomaly_reasons"]),
                     20, "the node's behaviour telemetry naming the new executable")
        finally:
            proc.kill()
            proc.wait()

        # The executable is gone: the risk falls back and access is restored.
        wait_for(lambda: risk_of(server, agent.node_id).get("score") == floor, 40,
                 "the node's risk to fall back to its baseline")
        wait_for(lambda: chat(camera, proxy, camera.token()).status_code == 200, 20,
                 "access to be restored")
    finally:
        for p in reversed(parts):
            p.stop()
        server.stop()
        broker.stop()


ANYONE_ON_THE_FLOOR = """
@id("floor-invokes")
permit (principal in Group::"factory-floor", action == Action::"invoke", resource);
@id("anyone-lists-models")
permit (principal, action == Action::"list_models", resource);
"""


def test_compromise_is_quarantined_and_other_nodes_keep_working(tmp_path):
    broker = Broker(tmp_path)
    server = Sigil(tmp_path, config=f'[telemetry]\nbroker = "{broker.url}"\n'
                                    "learning_windows = 5\n")
    parts = []
    try:
        a = Agent(server, tmp_path / "a", extra=["--posture-interval-secs", "0"])
        parts.append(a)
        b = Agent(server, tmp_path / "b", extra=["--posture-interval-secs", "0"])
        parts.append(b)
        register(server, b, "proxy", dns=["localhost"], enforcer=True)
        id_a = register(server, a, "cam-a", groups=["factory-floor"])
        id_b = register(server, b, "cam-b", groups=["factory-floor"])
        model = demo_model(server, tmp_path)
        parts.append(model)
        proxy = Proxy(server, b, tmp_path, model.url, ANYONE_ON_THE_FLOOR,
                      extra=["--telemetry-broker", broker.url, "--telemetry-window-secs", "1"])
        parts.append(proxy)
        cam_a = Workload(server, a, tmp_path, id_a)
        cam_b = Workload(server, b, tmp_path, id_b)
        proxy.wait_ready(cam_b.ctx)
        tok_a, tok_b = cam_a.token(), cam_b.token()

        # Both learn their usual behaviour: a few chat calls a second to defect-detector.
        client_a = httpx.Client(verify=cam_a.ctx, timeout=10)
        client_b = httpx.Client(verify=cam_b.ctx, timeout=10)
        msg = {"model": "defect-detector", "messages": [{"role": "user", "content": "frame"}]}
        end = time.time() + 9
        while time.time() < end:
            for c, t in ((client_a, tok_a), (client_b, tok_b)):
                r = c.post(f"{proxy.url}/v1/chat/completions",
                           headers={"Authorization": f"Bearer {t}"}, json=msg)
                assert r.status_code == 200, r.text
            time.sleep(0.25)

        # A holds a live connection open, as an attacker's session would.
        raw = cam_a.ctx.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port)),
                                    server_hostname="localhost")

        # The compromise: A starts pulling exfiltration-sized answers from a model it never
        # used (embeddings of many inputs at the largest dimension).
        big = {"model": "line-assistant", "input": ["part"] * 64, "dimensions": 4096}
        quarantined = None
        end = time.time() + 20
        while time.time() < end and quarantined is None:
            try:
                client_a.post(f"{proxy.url}/v1/embeddings",
                              headers={"Authorization": f"Bearer {tok_a}"}, json=big)
            except httpx.HTTPError:
                pass
            r = client_b.post(f"{proxy.url}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {tok_b}"}, json=msg)
            assert r.status_code == 200, f"benign B refused: {r.text}"
            qs = server.admin("node", "risk")["quarantines"]
            quarantined = next((q for q in qs if q.get("spiffe_id") == id_a), None)
            time.sleep(0.3)
        assert quarantined, server.admin("node", "risk")
        assert quarantined["node_id"] == a.node_id
        assert "anomaly" in quarantined["reason"]
        features = json.loads(quarantined["features_json"])
        assert features, quarantined

        # A's live connection is closed by the proxy, and A cannot get in again.
        raw.settimeout(10)
        assert raw.recv(1) == b"", "the quarantined workload's connection stayed open"
        raw.close()
        def a_refused():
            try:
                with httpx.Client(verify=cam_a.ctx, timeout=5) as c:
                    return c.post(f"{proxy.url}/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {tok_a}"},
                                  json=msg).status_code in (401, 403)
            except httpx.HTTPError:
                return True
        wait_for(a_refused, 10, "the quarantined workload to be refused")
        with httpx.Client(verify=cam_a.ctx, timeout=10) as c:
            t = c.post(server.url + "/oauth2/token",
                       data={"grant_type": "client_credentials", "resource": "model-gw"})
        assert t.status_code in (400, 401), t.text
        assert "quarantine" in t.text or "revoked" in t.text, t.text

        # B, on another node, keeps working throughout.
        for _ in range(5):
            r = client_b.post(f"{proxy.url}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {tok_b}"}, json=msg)
            assert r.status_code == 200, r.text

        # The quarantine is in the transparency log (verified), with what triggered it.
        ca = tmp_path / "bundle-for-log.pem"
        ca.write_text(server.bundle_pem())
        vkey = httpx.get(server.url + "/log/key", verify=str(ca)).text.strip()
        out = subprocess.run([server.bin, "log", "search", "--server", server.url, "--ca", str(ca),
                              "--key", vkey, "--spiffe-id", id_a], capture_output=True)
        assert out.returncode == 0, out.stderr
        records = [json.loads(line)["record"] for line in out.stdout.decode().splitlines()]
        q = [r for r in records if r["kind"] == "quarantine"]
        assert q and q[0]["action"] == "quarantine" and q[0]["node_id"] == a.node_id, records
        assert q[0]["features"] and q[0]["serials"], q[0]

        # An operator clears it: A gets a new SVID from its agent and is served again.
        server.admin("node", "clear", a.node_id, "--workload", id_a)
        assert not any(q.get("spiffe_id") == id_a
                       for q in server.admin("node", "risk")["quarantines"])
        def served_again():
            w = Workload(server, a, tmp_path / "again", id_a)
            with httpx.Client(verify=w.ctx, timeout=10) as c:
                return c.post(f"{proxy.url}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {w.token()}"},
                              json=msg).status_code == 200
        wait_for(served_again, 30, "the cleared workload to be served again")

        # By hand: a whole node; an unknown node is refused.
        out = server.admin("node", "quarantine", a.node_id, "--reason", "stolen device")
        assert out["revoked"] >= 1, out
        assert any(q["node_id"] == a.node_id and q.get("spiffe_id") is None
                   for q in server.admin("node", "risk")["quarantines"])
        r = client_b.post(f"{proxy.url}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {tok_b}"}, json=msg)
        assert r.status_code == 200, r.text
        bad = subprocess.run([server.bin, "node", "quarantine", f"spiffe://{TD}/sigil/node/nope",
                              "--socket", str(server.socket)], capture_output=True, text=True)
        assert bad.returncode != 0 and "no node" in bad.stderr, bad.stderr
        server.admin("node", "clear", a.node_id)
        assert server.admin("node", "risk")["quarantines"] == []
        client_a.close()
        client_b.close()
    finally:
        for p in reversed(parts):
            p.stop()
        server.stop()
        broker.stop()
