"""Sealed models end to end with real processes: a real `sigil server` (the KMS), a real
`sigil agent` (join token), `sigil model register/seal` on the admin socket, and `sigil model
open` as the workload: SVID from the agent, key released by the server over mTLS (HPKE to
the SVID key), decrypted into a memfd, then exec'd into a real model-serving child (a Python
HTTP server reading /proc/self/fd/N). Every refusal of the issue has its test; the released
key is opened with a third-party HPKE implementation (pyhpke) to prove RFC 9180 interop and
that another workload's key cannot open it."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

from conftest import TD, Agent, Workload, free_port, register, wait_for

CHUNK = 64 * 1024
MODEL = "defect-detector"

POLICY = f"""
@id("model-server-decrypts")
permit (principal == Workload::"spiffe://{TD}/model-server", action == Action::"decrypt",
        resource)
when {{ resource == Model::"{MODEL}" || resource == Model::"other-model" }};

@id("secure-model-needs-secureboot")
permit (principal == Workload::"spiffe://{TD}/model-server", action == Action::"decrypt",
        resource == Model::"secure-model")
when {{ context.node_selectors.contains("tpm:secureboot:true") }};
"""

SERVE = r"""
import hashlib, http.server, sys
path, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
print("serving", path, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class Models:
    def __init__(self, sigil, tmp_path):
        self.sigil = sigil
        self.root = tmp_path
        self.agent = Agent(sigil, tmp_path)
        self.server_id = register(sigil, self.agent, "model-server")
        self.other_id = register(sigil, self.agent, "intruder")
        pol = tmp_path / "policy"
        pol.mkdir()
        (pol / "models.cedar").write_text(POLICY)
        sigil.admin("policy", "push", str(pol))
        self.files = tmp_path / "models"
        self.files.mkdir()

    def seal(self, name: str, version: int, plain: bytes) -> Path:
        src = self.files / f"{name}-{version}.bin"
        src.write_bytes(plain)
        out = self.files / f"{name}-{version}.sealed"
        self.sigil.admin("model", "register", "--name", name, "--version", str(version))
        self.sigil.admin("model", "seal", str(src), "--name", name, "--version", str(version),
                         "-o", str(out), "--chunk-size", str(CHUNK))
        # The plaintext leaves the disk: only the sealed file stays.
        src.unlink()
        return out

    def open(self, sealed: Path, spiffe_id: str, *command: str, wait=True, **kw):
        args = [self.sigil.bin, "model", "open", str(sealed), "--socket", self.agent.endpoint,
                "--server", f"127.0.0.1:{self.sigil.port}", "--spiffe-id", spiffe_id,
                "--", *command]
        if not wait:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        return subprocess.run(args, capture_output=True, timeout=60, **kw)


@pytest.fixture()
def models(sigil, tmp_path):
    m = Models(sigil, tmp_path)
    # The agent has the workloads' SVIDs before any test opens a model.
    for sid in (m.server_id, m.other_id):
        Workload(sigil, m.agent, tmp_path, sid)
    yield m
    m.agent.stop()


def plaintext(n: int = 20 * CHUNK + 1234) -> bytes:
    return os.urandom(n)


def header_len(sealed: bytes) -> int:
    assert sealed[:8] == b"SIGILSM1"
    (n,) = struct.unpack(">I", sealed[8:12])
    return 12 + n + 64


def header_json(sealed: bytes) -> dict:
    (n,) = struct.unpack(">I", sealed[8:12])
    return json.loads(sealed[12:12 + n])


def chunk_span(sealed: bytes, i: int):
    start = header_len(sealed) + i * (CHUNK + 16)
    return start, start + CHUNK + 16


def test_round_trip_serves_exact_bytes_and_leaves_no_plaintext_on_disk(models, tmp_path):
    plain = plaintext()
    started = time.time()
    sealed = models.seal(MODEL, 3, plain)
    assert plain[:64 * 1024] not in sealed.read_bytes()
    port = free_port()
    proc = models.open(sealed, models.server_id, sys.executable, "-c", SERVE, "{model}", str(port),
                       wait=False)
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("serving /proc/self/fd/"), (line, proc.stderr.read1(4096))
        got = wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=5).content, 20,
                       "the model server")
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(plain).hexdigest()
        # The memfd is sealed: the child cannot write it back, nor can anyone through /proc.
        fd_path = line.split()[1]
        pid = proc.pid
        with pytest.raises(PermissionError):
            with open(f"/proc/{pid}/fd/{fd_path.rsplit('/', 1)[1]}", "r+b") as f:
                f.write(b"x")
        # No plaintext on disk: the data dirs, this test's dir and the temp dirs hold no
        # copy of the plaintext's first 64 KiB.
        needle = plain[:64 * 1024]
        hits = scan_for(needle, [tmp_path, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")],
                        since=started - 1)
        assert hits == [], hits
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # The release is in the transparency log, verified: a key-release leaf for this workload.
    ca = tmp_path / "bundle-for-log.pem"
    ca.write_text(models.sigil.bundle_pem())
    vkey = httpx.get(models.sigil.url + "/log/key", verify=str(ca)).text.strip()
    out = subprocess.run([models.sigil.bin, "log", "search", "--server", models.sigil.url,
                          "--ca", str(ca), "--key", vkey, "--spiffe-id", models.server_id],
                         capture_output=True)
    assert out.returncode == 0, out.stderr
    kinds = [json.loads(line)["record"]["kind"] for line in out.stdout.decode().splitlines()]
    assert "key-release" in kinds, out.stdout


def scan_for(needle: bytes, roots, since: float):
    """Files under `roots` changed since `since` that contain `needle` (read in blocks, so
    memory stays small whatever the files' sizes)."""
    hits = []
    block = 8 << 20
    for root in roots:
        for dirpath, _dirs, files in os.walk(root, onerror=lambda e: None):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                    if not os.path.isfile(p) or os.path.islink(p) or st.st_mtime < since:
                        continue
                    if st.st_size < len(needle):
                        continue
                    with open(p, "rb") as f:
                        tail = b""
                        while True:
                            b = f.read(block)
                            if not b:
                                break
                            if needle in tail + b:
                                hits.append(p)
                                break
                            tail = b[-(len(needle) - 1):]
                except OSError:
                    continue
    return hits


def test_sha256sum_child_sees_the_plaintext(models):
    plain = plaintext(3 * CHUNK)
    sealed = models.seal(MODEL, 4, plain)
    out = models.open(sealed, models.server_id, "sha256sum", "{model}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].decode() == hashlib.sha256(plain).hexdigest()
    assert out.stdout.split()[1].decode().startswith("/proc/self/fd/")


def refused(models, sealed: Path, spiffe_id=None):
    marker = models.root / "child-ran"
    out = models.open(sealed, spiffe_id or models.server_id, "touch", str(marker))
    assert out.returncode != 0, out
    assert not marker.exists(), "the command must not run on a refused model"
    return out.stderr.decode()


def test_flipped_bit_in_any_chunk_is_refused_naming_the_chunk(models):
    plain = plaintext()
    sealed = models.seal(MODEL, 5, plain)
    data = sealed.read_bytes()
    n = header_json(data)["plaintext_len"] // CHUNK + 1
    for i in (0, 7, n - 1):
        start, end = chunk_span(data, i)
        bad = bytearray(data)
        bad[min(start + 100, len(bad) - 1)] ^= 0x04
        p = models.files / f"flip-{i}.sealed"
        p.write_bytes(bytes(bad))
        err = refused(models, p)
        assert f"chunk {i} of {n}" in err, err


def test_truncated_file_is_refused(models):
    sealed = models.seal(MODEL, 6, plaintext())
    data = sealed.read_bytes()
    start, _ = chunk_span(data, 5)
    for cut in (start, len(data) - 1):
        p = models.files / f"cut-{cut}.sealed"
        p.write_bytes(data[:cut])
        assert "truncated" in refused(models, p)


def test_swapped_chunks_are_refused(models):
    sealed = models.seal(MODEL, 7, plaintext())
    data = bytearray(sealed.read_bytes())
    a0, a1 = chunk_span(data, 2)
    b0, b1 = chunk_span(data, 3)
    data[a0:a1], data[b0:b1] = data[b0:b1], data[a0:a1]
    p = models.files / "swapped.sealed"
    p.write_bytes(bytes(data))
    assert "chunk 2 of" in refused(models, p)


def test_header_from_another_model_is_refused(models):
    plain = plaintext()
    a = models.seal(MODEL, 8, plain).read_bytes()
    b = models.seal("other-model", 1, plain).read_bytes()
    p = models.files / "mixed.sealed"
    p.write_bytes(b[:header_len(b)] + a[header_len(a):])
    err = refused(models, p)
    assert "chunk 0 of" in err, err
    # A header edited to name the other model no longer matches its signature or the
    # header the server sealed for that version: the release is refused.
    hj = header_json(a)
    hj["name"] = "other-model"
    hj["version"] = 1
    body = json.dumps(hj, separators=(",", ":"), sort_keys=True).encode()
    forged = b"SIGILSM1" + struct.pack(">I", len(body)) + body + a[header_len(a) - 64:]
    p2 = models.files / "forged.sealed"
    p2.write_bytes(forged + a[header_len(a):])
    err = refused(models, p2)
    assert "header" in err, err


def test_release_without_decrypt_permission_is_refused(models):
    sealed = models.seal(MODEL, 9, plaintext(CHUNK))
    err = refused(models, sealed, models.other_id)
    assert "403" in err and "does not permit" in err, err


def test_node_whose_selectors_fail_the_policy_is_refused(models):
    # secure-model needs a node attested with tpm:secureboot:true; this join-token node
    # has no such selector.
    sealed = models.seal("secure-model", 1, plaintext(CHUNK))
    err = refused(models, sealed)
    assert "403" in err and "selectors" in err, err


def test_released_key_opens_with_pyhpke_only_for_its_workload(models, tmp_path):
    plain = plaintext(2 * CHUNK)
    sealed = models.seal(MODEL, 10, plain).read_bytes()
    me = Workload(models.sigil, models.agent, tmp_path, models.server_id)
    other = Workload(models.sigil, models.agent, tmp_path, models.other_id)
    hj = header_json(sealed)
    binding = hashlib.sha256(sealed[:header_len(sealed) - 64]).digest()
    with httpx.Client(verify=me.ctx, timeout=10) as c:
        r = c.post(models.sigil.url + "/models/v1/release",
                   json={"name": MODEL, "version": 10, "header_sha256": binding.hex()})
    assert r.status_code == 200, r.text
    rel = r.json()
    import base64
    enc = base64.b64decode(rel["enc"])
    ct = base64.b64decode(rel["ciphertext"])
    suite = CipherSuite.new(KEMId.DHKEM_P256_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
    info = (f"sigil model key release v1\0{MODEL}\0{10}\0{models.server_id}\0".encode()
            + binding)

    def open_with(w: Workload, info=info):
        key = serialization.load_pem_private_key(w.key.read_bytes(), None)
        skr = KEMKey.from_pyca_cryptography_key(key)
        return suite.create_recipient_context(enc, skr, info=info).open(ct, aad=b"")

    data_key = open_with(me)
    assert len(data_key) == 32
    # With the data key, a third-party AES-GCM decrypts chunk 0 under the documented nonce
    # layout (7-byte prefix || BE32 counter || last flag) and AAD (the header's hash).
    nonce = bytes.fromhex(hj["nonce_prefix"]) + struct.pack(">I", 0) + b"\0"
    s0, s1 = chunk_span(sealed, 0)
    assert AESGCM(data_key).decrypt(nonce, sealed[s0:s1], binding) == plain[:CHUNK]
    # Replayed to another workload (another SVID key): it cannot unwrap.
    with pytest.raises(Exception):
        open_with(other)
    # Nor under another binding (e.g. claiming it is for the other workload).
    with pytest.raises(Exception):
        open_with(me, info=info.replace(models.server_id.encode(), models.other_id.encode()))
    # And the server will not release to the other workload at all.
    with httpx.Client(verify=other.ctx, timeout=10) as c:
        r = c.post(models.sigil.url + "/models/v1/release",
                   json={"name": MODEL, "version": 10, "header_sha256": binding.hex()})
    assert r.status_code == 403, r.text
    # Nor without a client certificate.
    ctx = __import__("ssl").create_default_context(cafile=str(me.bundle))
    with httpx.Client(verify=ctx, timeout=10) as c:
        r = c.post(models.sigil.url + "/models/v1/release",
                   json={"name": MODEL, "version": 10, "header_sha256": binding.hex()})
    assert r.status_code == 401, r.text


def test_a_version_seals_one_file_only(models):
    models.seal(MODEL, 11, plaintext(CHUNK))
    src = models.files / "again.bin"
    src.write_bytes(b"x" * 100)
    out = subprocess.run([models.sigil.bin, "model", "seal", str(src), "--name", MODEL,
                          "--version", "11", "--socket", str(models.sigil.socket)],
                         capture_output=True)
    assert out.returncode != 0
    assert b"sealed before" in out.stderr, out.stderr
