"""An independent check of sigil's transparency-log checkpoint: the C2SP signed note is parsed
and its Ed25519 signature verified with `cryptography`, the key ID recomputed from the vkey
(C2SP signed-note), and the root hash of a one-leaf-per-identity tree checked against the
entries bundle with RFC 9162 hashing written out here."""
import base64
import hashlib
import ssl
import urllib.request

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def get(sigil, ctx, path: str) -> bytes:
    with urllib.request.urlopen(sigil.url + path, context=ctx) as r:
        return r.read()


def merkle_root(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + merkle_root(leaves[:k]) + merkle_root(leaves[k:])).digest()


def test_checkpoint_signature_verifies_with_cryptography(sigil, tmp_path):
    sigil.admin("svid", "mint", "--spiffe-id", "spiffe://interop.test/py/tlog",
                "--out-dir", str(tmp_path / "svid"))
    ctx = ssl.create_default_context(cadata=sigil.bundle_pem())

    vkey = get(sigil, ctx, "/log/key").decode().strip()
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    assert key[0] == 0x01 and len(key) == 33
    assert hashlib.sha256(name.encode() + b"\n" + key).digest()[:4].hex() == key_id_hex

    note = get(sigil, ctx, "/log/checkpoint").decode()
    text, sigs = note.split("\n\n", 1)
    text += "\n"
    origin, size, root_b64 = text.splitlines()
    assert origin == name
    sig_line = sigs.strip().splitlines()[0]
    assert sig_line.startswith(f"\u2014 {name} ")
    raw = base64.b64decode(sig_line.split(" ")[2])
    assert raw[:4].hex() == key_id_hex
    # Raises InvalidSignature if it does not verify.
    Ed25519PublicKey.from_public_bytes(key[1:]).verify(raw[4:], text.encode())

    size = int(size)
    assert size >= 2  # the server's own SVID and the minted one
    bundle = get(sigil, ctx, f"/log/tile/entries/000.p/{size}")
    leaves = []
    while bundle:
        n = int.from_bytes(bundle[:2], "big")
        leaves.append(bundle[2:2 + n])
        bundle = bundle[2 + n:]
    assert len(leaves) == size
    assert merkle_root(leaves) == base64.b64decode(root_b64)
