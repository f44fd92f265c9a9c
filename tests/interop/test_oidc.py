"""An independent OIDC/JWT library (PyJWT) validates sigil's JWT-SVIDs and access tokens
using only the discovery document and JWKS that sigil serves over HTTPS."""
import base64
import hashlib
import json
import ssl
import urllib.request

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import TD


def tls_context(bundle: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=bundle)


def discover(sigil, ctx):
    with urllib.request.urlopen(sigil.url + "/.well-known/openid-configuration", context=ctx) as r:
        return json.load(r)


def test_pyjwt_validates_jwt_svid_and_access_token(sigil, tmp_path):
    spiffe_id = f"spiffe://{TD}/agent"
    sigil.admin("entry", "create", "--spiffe-id", spiffe_id, "--parent-id",
                f"spiffe://{TD}/sigil/node/n1", "--selector", "unix:uid:1000",
                "--scope", "model:invoke")
    out = tmp_path / "svid"
    sigil.admin("svid", "mint", "--spiffe-id", spiffe_id, "--out-dir", str(out))
    bundle = str(out / "bundle.pem")
    ctx = tls_context(bundle)

    doc = discover(sigil, ctx)
    assert doc["issuer"] == sigil.url
    assert doc["token_endpoint_auth_methods_supported"] == ["tls_client_auth", "private_key_jwt"]
    assert doc["tls_client_certificate_bound_access_tokens"] is True
    jwks = jwt.PyJWKClient(doc["jwks_uri"], ssl_context=ctx)

    # JWT-SVID
    svid = sigil.admin("svid", "mint-jwt", "--spiffe-id", spiffe_id, "--audience", "model-gw")["token"]
    key = jwks.get_signing_key_from_jwt(svid)
    claims = jwt.decode(svid, key.key, algorithms=["ES256"], audience="model-gw",
                        options={"require": ["sub", "aud", "exp"]})
    assert claims["sub"] == spiffe_id
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(svid, key.key, algorithms=["ES256"], audience="other")

    # Access token over mTLS (RFC 8705), shaped per RFC 9068.
    mtls = tls_context(bundle)
    mtls.load_cert_chain(str(out / "svid.pem"), str(out / "key.pem"))
    with httpx.Client(verify=mtls) as client:
        r = client.post(doc["token_endpoint"],
                        data={"grant_type": "client_credentials", "scope": "model:invoke"})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    token = r.json()["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    key = jwks.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sigil", issuer=doc["issuer"],
                        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]})
    assert claims["client_id"] == spiffe_id and claims["scope"] == "model:invoke"
    cert = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    thumb = base64.urlsafe_b64encode(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()).rstrip(b"=")
    assert claims["cnf"]["x5t#S256"] == thumb.decode()

    # A flipped signature byte fails in an independent validator too.
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 1
    forged = ".".join([head, body, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key.key, algorithms=["ES256"], audience="sigil")


def test_token_endpoint_errors_use_rfc6749_shape(sigil, tmp_path):
    out = tmp_path / "svid"
    sigil.admin("svid", "mint", "--spiffe-id", f"spiffe://{TD}/nobody", "--out-dir", str(out))
    ctx = tls_context(str(out / "bundle.pem"))
    with httpx.Client(verify=ctx) as client:
        r = client.post(sigil.url + "/oauth2/token", data={"grant_type": "client_credentials"})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"
    assert "error_description" in r.json()
