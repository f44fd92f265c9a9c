"""Secrets end to end with real processes: a real `sigil server` (secrets encrypted at rest
under its KEK, decided by Cedar), a real `sigil agent` serving the Secrets API on its
Workload API socket and rendering secret files, `sigil secret` on the admin socket, and
workloads reading through the agent (`sigil secret read`, the agent's gRPC client) or
directly over mTLS with their X.509-SVID (httpx). Every refusal has its test: no permit,
a revoked identity, another uid on the same node; and a refused workload learns nothing,
not even whether the path exists."""
import json
import os
import pwd
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import TD, Agent, Sigil, Workload, register, wait_for

VALUE = "pg-password-Zq8#not-in-any-file"

POLICY = f"""
@id("billing-reads-its-secrets")
permit (principal == Workload::"spiffe://{TD}/billing", action == Action::"read_secret",
        resource)
when {{ resource == Secret::"app/db" || resource == Secret::"app/missing" }};

@id("renderer-reads-app-db")
permit (principal == Workload::"spiffe://{TD}/renderer", action == Action::"read_secret",
        resource == Secret::"app/db");
"""

NOBODY = pwd.getpwnam("nobody").pw_uid


def as_nobody():
    os.setgid(pwd.getpwnam("nobody").pw_gid)
    os.setuid(NOBODY)


def reachable_by_others(path: Path):
    """Lets other uids traverse (not list) every directory down to `path`."""
    for d in [path, *path.parents]:
        if d == Path("/"):
            break
        d.chmod(d.stat().st_mode | 0o011)


def nobody_can_run_sigil(s: "Secrets") -> str:
    """A copy of the sigil binary that nobody can execute (the build's may sit under a
    directory only root can enter), with the agent socket reachable by other uids."""
    d = s.root / "nobody-bin"
    d.mkdir(exist_ok=True)
    b = d / "sigil"
    b.write_bytes(Path(s.sigil.bin).read_bytes())
    b.chmod(0o755)
    d.chmod(0o755)
    reachable_by_others(d)
    reachable_by_others(s.agent.socket.parent)
    return str(b)


class Secrets:
    def __init__(self, sigil: Sigil, root: Path, agent_extra=()):
        self.sigil = sigil
        self.root = root
        self.agent = Agent(sigil, root)
        if agent_extra:
            self.agent.stop()
            self.agent.start(list(agent_extra))
        self.billing = register(sigil, self.agent, "billing")
        self.intruder = register(sigil, self.agent, "intruder")
        pol = root / "policy"
        pol.mkdir()
        (pol / "secrets.cedar").write_text(POLICY)
        sigil.admin("policy", "push", str(pol))

    def put(self, path: str, value: str) -> dict:
        out = subprocess.run(
            [self.sigil.bin, "secret", "put", path, "--socket", str(self.sigil.socket),
             "--output", "json"],
            input=value.encode(), capture_output=True, check=True)
        return json.loads(out.stdout)

    def read(self, path: str, spiffe_id: str = "", bin: str = "",
             **kw) -> subprocess.CompletedProcess:
        args = [bin or self.sigil.bin, "secret", "read", path, "--socket", self.agent.endpoint, "--json"]
        if spiffe_id:
            args += ["--spiffe-id", spiffe_id]
        return subprocess.run(args, capture_output=True, timeout=30, **kw)


def wait_svids(s: Secrets, *ids: str):
    for sid in ids:
        Workload(s.sigil, s.agent, s.root, sid)


@pytest.fixture()
def secrets(sigil, tmp_path):
    s = Secrets(sigil, tmp_path)
    wait_svids(s, s.billing, s.intruder)
    yield s
    s.agent.stop()


def test_an_entitled_workload_reads_through_the_agent_and_directly(secrets, tmp_path):
    put = secrets.put("app/db", VALUE)
    assert put["version"] == 1
    r = secrets.read("app/db", secrets.billing)
    assert r.returncode == 0, r.stderr.decode()
    got = json.loads(r.stdout)
    assert got["value"] == VALUE and got["version"] == 1
    assert got["spiffe_id"] == secrets.billing
    assert 0 < got["lease_duration"] <= 300 and not got["renewable"]
    # A new version is what the next read gets.
    assert secrets.put("app/db", VALUE + "-v2")["version"] == 2
    got = json.loads(secrets.read("app/db", secrets.billing).stdout)
    assert (got["value"], got["version"]) == (VALUE + "-v2", 2)
    # The same over mTLS with the workload's own SVID, by a client written by others.
    w = Workload(secrets.sigil, secrets.agent, tmp_path, secrets.billing)
    with httpx.Client(verify=w.ctx, timeout=10) as c:
        r = c.post(secrets.sigil.url + "/secrets/v1/read", json={"path": "app/db"})
        assert r.status_code == 200, r.text
        import base64
        assert base64.b64decode(r.json()["value_b64"]).decode() == VALUE + "-v2"
        # Without a client certificate: 401.
    with httpx.Client(verify=ssl.create_default_context(cafile=str(w.bundle)), timeout=10) as c:
        r = c.post(secrets.sigil.url + "/secrets/v1/read", json={"path": "app/db"})
        assert r.status_code == 401, r.text
    # Every read is in the transparency log, with who read which version.
    versions = secrets.sigil.admin("secret", "versions", "app/db")["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    listed = secrets.sigil.admin("secret", "list")["secrets"]
    assert [(s["path"], s["version"]) for s in listed] == [("app/db", 2)]


def test_a_workload_without_permission_learns_nothing(secrets):
    secrets.put("app/db", VALUE)
    denied = []
    for path in ("app/db", "app/does-not-exist", "database/creds/nothing"):
        r = secrets.read(path, secrets.intruder)
        assert r.returncode != 0
        denied.append(r.stderr.decode().strip().splitlines()[-1])
    # The same answer whether the path exists or not.
    assert len(set(denied)) == 1, denied
    assert "PermissionDenied" in denied[0] and "not permitted" in denied[0]
    # A permitted path with nothing at it is "not found" (the workload may know of it).
    r = secrets.read("app/missing", secrets.billing)
    assert r.returncode != 0 and "NotFound" in r.stderr.decode()
    # A malformed path is refused as such.
    r = secrets.read("app/../db", secrets.billing)
    assert r.returncode != 0 and "InvalidArgument" in r.stderr.decode()
    assert VALUE not in (r.stdout + r.stderr).decode()


def test_a_revoked_workload_is_refused(secrets):
    secrets.put("app/db", VALUE)
    assert secrets.read("app/db", secrets.billing).returncode == 0
    secrets.sigil.admin("svid", "revoke", secrets.billing, "--reason", "compromised")
    r = secrets.read("app/db", secrets.billing)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "PermissionDenied" in err and "revoked" in err, err
    assert VALUE not in r.stdout.decode()


def test_another_uid_on_the_node_is_refused_by_the_agent(secrets, tmp_path):
    secrets.put("app/db", VALUE)
    bin = nobody_can_run_sigil(secrets)
    # The same binary works for this uid (so the refusal below is about the caller).
    assert secrets.read("app/db", secrets.billing, bin=bin).returncode == 0
    r = secrets.read("app/db", secrets.billing, bin=bin, preexec_fn=as_nobody)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "PermissionDenied" in err and "no registration entry matches" in err, err
    r = secrets.read("app/db", bin=bin, preexec_fn=as_nobody)
    assert r.returncode != 0 and "PermissionDenied" in r.stderr.decode()


def test_the_database_holds_no_plaintext(secrets):
    marker = "plaintext-marker-" + os.urandom(8).hex()
    secrets.put("app/db", marker)
    secrets.put("app/other", marker + "-2")
    assert json.loads(secrets.read("app/db", secrets.billing).stdout)["value"] == marker
    # Every file of the server (SQLite database, its WAL, keys, logs) is free of the value.
    for f in secrets.sigil.dir.rglob("*"):
        if f.is_file() and not f.name.endswith(".sock"):
            assert marker.encode() not in f.read_bytes(), f
    assert marker.encode() not in (secrets.root / "server.log").read_bytes()
    assert marker.encode() not in (secrets.root / "agent.log").read_bytes()
    # Deleting destroys every version; a read is then "not found" for the entitled.
    secrets.sigil.admin("secret", "delete", "app/db")
    r = secrets.read("app/db", secrets.billing)
    assert r.returncode != 0 and "NotFound" in r.stderr.decode()


def test_secret_files_are_rendered_for_the_workload_uid_and_removed_on_revocation(tmp_path):
    sigil = Sigil(tmp_path, config="secret_lease_secs = 3\n")
    shm = Path("/dev/shm") / f"sigil-test-{os.getpid()}-{time.time_ns()}"
    try:
        s = Secrets(sigil, tmp_path)
        renderer = f"spiffe://{TD}/renderer"
        sigil.admin("entry", "create", "--spiffe-id", renderer, "--parent-id", s.agent.node_id,
                    "--selector", f"unix:uid:{NOBODY}")
        s.put("app/db", VALUE)
        s.agent.stop()
        s.agent.start(["--secrets-dir", str(shm),
                       "--secret-file", f"{renderer},app/db,db-password"])
        f = shm / str(NOBODY) / "db-password"
        wait_for(lambda: f.exists() and f.read_text() == VALUE, 30, "the rendered secret file")
        st = f.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o400)
        assert (f.parent.stat().st_uid, f.parent.stat().st_mode & 0o777) == (NOBODY, 0o500)
        # The owner reads it; another uid (not root) cannot.
        r = subprocess.run(["cat", str(f)], capture_output=True, preexec_fn=as_nobody)
        assert r.stdout.decode() == VALUE
        # A new version is rendered before the (3 s) lease ends.
        s.put("app/db", VALUE + "-rotated")
        wait_for(lambda: f.read_text() == VALUE + "-rotated", 15, "the re-rendered file")
        # The value is in no process argument or environment of the agent.
        cmdline = Path(f"/proc/{s.agent.proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{s.agent.proc.pid}/environ").read_bytes()
        assert VALUE.encode() not in cmdline + environ
        # Revoking the workload's identity: the next refresh is refused and the file goes.
        sigil.admin("svid", "revoke", renderer)
        wait_for(lambda: not f.exists(), 15, "the secret file removed after revocation")
        s.agent.stop()
    finally:
        sigil.stop()
        subprocess.run(["rm", "-rf", str(shm)], check=False)


# ---- dynamic PostgreSQL credentials, against the real local PostgreSQL ----

PG_URL = os.environ.get("SIGIL_TEST_POSTGRES_URL", "")

DB_POLICY = f"""
@id("billing-gets-db-creds")
permit (principal == Workload::"spiffe://{TD}/billing", action == Action::"read_secret",
        resource == Secret::"database/creds/app_ro");
"""


def psql(*sql: str, url: str = "", user: str = "", password: str = "", **kw):
    """Runs SQL with `psql` (PostgreSQL's own client) as the admin, or as a given user."""
    from urllib.parse import urlparse
    u = urlparse(url or PG_URL)
    env = dict(os.environ, PGHOST=u.hostname or "127.0.0.1", PGPORT=str(u.port or 5432),
               PGDATABASE=u.path.lstrip("/") or "postgres", PGUSER=user or u.username or "postgres",
               PGCONNECT_TIMEOUT="5")
    if password:
        env["PGPASSWORD"] = password
    args = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At"]
    for s in sql:
        args += ["-c", s]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=30, **kw)


def role_exists(name: str) -> bool:
    r = psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip() == "1"


@pytest.fixture()
def dynamic(sigil, tmp_path):
    if not PG_URL:
        pytest.skip("SIGIL_TEST_POSTGRES_URL is not set (scripts/test sets it when PostgreSQL runs)")
    table = f"sigil_dyn_{os.getpid()}_{time.time_ns() % 10**9}"
    assert psql(f"CREATE TABLE {table} (v text)", f"INSERT INTO {table} VALUES ('row')").returncode == 0
    s = Secrets(sigil, tmp_path)
    (tmp_path / "policy" / "db.cedar").write_text(DB_POLICY)
    sigil.admin("policy", "push", str(tmp_path / "policy"))
    wait_svids(s, s.billing, s.intruder)
    sigil.admin("secret", "db-role", "put", "app_ro", "--connection-url", PG_URL,
                "--creation-sql",
                "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; "
                f"GRANT SELECT ON {table} TO \"{{{{name}}}}\";",
                "--default-ttl", "1h", "--max-ttl", "2h")
    s.table = table
    yield s
    s.agent.stop()
    psql(f"DROP TABLE IF EXISTS {table}")


def creds(s: Secrets, ttl: str = "") -> dict:
    args = [s.sigil.bin, "secret", "read", "database/creds/app_ro", "--socket", s.agent.endpoint,
            "--spiffe-id", s.billing, "--json", *(["--ttl", ttl] if ttl else [])]
    r = subprocess.run(args, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    out.update(json.loads(out["value"]))
    return out


def open_session(s: Secrets, c: dict) -> subprocess.Popen:
    """A long-running session as the dynamic user; prints its first row, then sleeps."""
    from urllib.parse import urlparse
    u = urlparse(PG_URL)
    env = dict(os.environ, PGHOST=u.hostname or "127.0.0.1", PGPORT=str(u.port or 5432),
               PGDATABASE=u.path.lstrip("/"), PGUSER=c["username"], PGPASSWORD=c["password"])
    p = subprocess.Popen(["psql", "-X", "-At", "-c", f"SELECT v FROM {s.table}", "-c",
                          "SELECT pg_sleep(120)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "row", p.stderr.read()
    return p


def test_a_dynamic_credential_connects_and_ends_with_its_lease(dynamic):
    c = creds(dynamic, ttl="4s")
    assert c["username"].startswith("sigil_app_ro_") and c["renewable"]
    assert 1 <= c["lease_duration"] <= 4
    assert role_exists(c["username"])
    # It connects and reads what the role was granted, and nothing else.
    r = psql(f"SELECT v FROM {dynamic.table}", user=c["username"], password=c["password"])
    assert (r.returncode, r.stdout.strip()) == (0, "row"), r.stderr
    r = psql("SELECT count(*) FROM pg_authid", user=c["username"], password=c["password"])
    assert r.returncode != 0
    # The lease is listed; VALID UNTIL is its end.
    leases = dynamic.sigil.admin("lease", "list")["leases"]
    assert [(l["id"], l["username"]) for l in leases] == [(c["lease_id"], c["username"])]
    until = psql(f"SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles "
                 f"WHERE rolname = '{c['username']}'").stdout.strip()
    assert int(until) == c["expires_at"]
    session = open_session(dynamic, c)
    # At the lease end the open session is terminated and the role is gone.
    assert session.wait(timeout=20) != 0
    assert "terminat" in session.stderr.read().lower()
    wait_for(lambda: not role_exists(c["username"]), 10, "the role dropped")
    closed = dynamic.sigil.admin("lease", "list", "--all")["leases"]
    assert [(l["id"], l["revoke_reason"]) for l in closed] == [(c["lease_id"], "expired")]
    # Another workload is refused, and learns nothing of the role.
    r = subprocess.run([dynamic.sigil.bin, "secret", "read", "database/creds/app_ro", "--socket",
                        dynamic.agent.endpoint, "--spiffe-id", dynamic.intruder],
                       capture_output=True, timeout=30)
    assert r.returncode != 0 and "not permitted" in r.stderr.decode()


def test_revoking_the_workload_drops_its_roles_and_ends_their_sessions(dynamic):
    c = creds(dynamic, ttl="10m")
    other = creds(dynamic)
    assert c["username"] != other["username"] and c["password"] != other["password"]
    # Renewal moves VALID UNTIL with the lease (the holder renews through its agent).
    r = subprocess.run([dynamic.sigil.bin, "secret", "renew", c["lease_id"], "--socket",
                        dynamic.agent.endpoint, "--spiffe-id", dynamic.billing,
                        "--increment", "2h"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    renewed = json.loads(r.stdout)
    # Up to the SVID's expiry (the lease never outlives the identity), past the first end.
    assert renewed["expires_at"] > c["expires_at"] + 600
    until = psql(f"SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles "
                 f"WHERE rolname = '{c['username']}'").stdout.strip()
    assert int(until) == renewed["expires_at"]
    session = open_session(dynamic, c)
    dynamic.sigil.admin("svid", "revoke", dynamic.billing, "--reason", "compromised")
    assert session.wait(timeout=15) != 0
    wait_for(lambda: not role_exists(c["username"]) and not role_exists(other["username"]), 10,
             "both roles dropped")
    reasons = {l["revoke_reason"] for l in dynamic.sigil.admin("lease", "list", "--all")["leases"]}
    assert reasons == {"identity revoked"}
    r = psql("SELECT 1", user=c["username"], password=c["password"])
    assert r.returncode != 0


def test_evicting_the_node_drops_the_roles_of_its_workloads(dynamic):
    c = creds(dynamic)
    session = open_session(dynamic, c)
    dynamic.sigil.admin("node", "evict", dynamic.agent.node_id)
    assert session.wait(timeout=15) != 0
    wait_for(lambda: not role_exists(c["username"]), 10, "the role dropped")
    leases = dynamic.sigil.admin("lease", "list", "--all")["leases"]
    assert [(l["id"], l["revoke_reason"]) for l in leases] == [(c["lease_id"], "node evicted")]


def test_holder_and_admin_revocations_and_every_step_is_in_the_log(dynamic, tmp_path):
    mine, theirs = creds(dynamic), creds(dynamic)
    # The holder ends its own lease through its agent; another workload cannot.
    base = [dynamic.sigil.bin, "secret", "revoke", mine["lease_id"], "--socket",
            dynamic.agent.endpoint]
    r = subprocess.run([*base, "--spiffe-id", dynamic.intruder], capture_output=True, timeout=30)
    assert r.returncode != 0 and "NotFound" in r.stderr.decode()
    assert role_exists(mine["username"])
    r = subprocess.run([*base, "--spiffe-id", dynamic.billing], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert not role_exists(mine["username"])
    # The administrator ends another.
    dynamic.sigil.admin("lease", "revoke", theirs["lease_id"])
    assert not role_exists(theirs["username"])
    reasons = sorted(l["revoke_reason"] for l in
                     dynamic.sigil.admin("lease", "list", "--all")["leases"])
    assert reasons == ["revoked by the administrator", "revoked by the holder"]
    # A closed lease cannot be renewed.
    r = subprocess.run([dynamic.sigil.bin, "secret", "renew", mine["lease_id"], "--socket",
                        dynamic.agent.endpoint, "--spiffe-id", dynamic.billing],
                       capture_output=True, timeout=30)
    assert r.returncode != 0 and "NotFound" in r.stderr.decode()
    # Issue and revocation of both, and a static read, are verified leaves of the log.
    dynamic.put("app/db", VALUE)
    assert dynamic.read("app/db", dynamic.billing).returncode == 0
    ca = tmp_path / "bundle-for-log.pem"
    ca.write_text(dynamic.sigil.bundle_pem())
    vkey = httpx.get(dynamic.sigil.url + "/log/key", verify=ssl.create_default_context(
        cafile=str(ca))).text.strip()
    out = subprocess.run([dynamic.sigil.bin, "log", "search", "--server", dynamic.sigil.url,
                          "--ca", str(ca), "--key", vkey, "--spiffe-id", dynamic.billing],
                         capture_output=True)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line)["record"] for line in out.stdout.decode().splitlines()]
    steps = sorted((r["kind"], r.get("action"), r.get("lease_id") or r.get("path"))
                   for r in records if r["kind"] in ("lease", "secret"))
    leases = {mine["lease_id"], theirs["lease_id"]}
    assert [s for s in steps if s[0] == "lease"] == sorted(
        [("lease", a, lid) for lid in leases for a in ("issue", "revoke")])
    reads = [r for r in records if r["kind"] == "secret"]
    assert [(r["action"], r["path"], r["revision"]) for r in reads] == [("read", "app/db", 1)]
    assert VALUE not in out.stdout.decode()
