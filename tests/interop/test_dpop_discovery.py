"""DPoP (RFC 9449) for clients without mTLS, and OAuth discovery (RFC 8414, RFC 9728).

A client without a certificate authenticates to a real `sigil server` with its JWT-SVID (from
the real agent, via the pinned `spiffe` package) as client assertion and gets a DPoP-bound
token; it calls a real `sigil proxy --dpop` with proofs made by PyJWT + cryptography (a real
third-party JOSE implementation). Each way a proof can be wrong is refused, one test each. The
`mcp` package's client auth support finds the authorization server from the proxy's 401."""
import asyncio
import base64
import hashlib
import json
import ssl
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient

from conftest import TD, Agent, Proxy, Sigil, Workload, demo_model, register

CONSOLE = f"spiffe://{TD}/console"
POLICY = f"""
@id("console-invokes")
permit (principal == Workload::"{CONSOLE}", action == Action::"invoke",
        resource == Model::"line-assistant");
"""
BODY = {"model": "line-assistant", "messages": [{"role": "user", "content": "status?"}]}


class DpopKey:
    """An ES256 key and the DPoP proofs it signs (PyJWT)."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))

    @property
    def jkt(self) -> str:
        members = {k: self.jwk[k] for k in ("crv", "kty", "x", "y")}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()

    def proof(self, method: str, url: str, token: str | None = None, *, iat=None, jti=None,
              jwk=None, nonce=None, ath_of=None) -> str:
        claims = {"jti": jti or str(uuid.uuid4()), "htm": method, "htu": url,
                  "iat": int(time.time()) if iat is None else iat}
        if token or ath_of:
            digest = hashlib.sha256((ath_of or token).encode()).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if nonce:
            claims["nonce"] = nonce
        return jwt.encode(claims, self.key, algorithm="ES256",
                          headers={"typ": "dpop+jwt", "jwk": jwk or self.jwk})


class Stack:
    def __init__(self, root):
        self.parts = []
        try:
            self.server = Sigil(root)
            self.parts.append(self.server)
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            register(self.server, self.agent, "console", scopes=["model:invoke"])
            self.model = demo_model(self.server, root)
            self.parts.append(self.model)
            self.proxy = Proxy(self.server, self.agent, root, self.model.url, POLICY,
                               extra=["--dpop"])
            self.parts.append(self.proxy)
            self.console = Workload(self.server, self.agent, root, CONSOLE)
            self.proxy.wait_ready(self.console.ctx)
            # A client without a certificate: it trusts the bundle and presents nothing.
            self.anon = ssl.create_default_context(cafile=str(self.console.bundle))
            self.token_url = f"{self.server.url}/oauth2/token"
            self.chat_url = f"{self.proxy.url}/v1/chat/completions"
        except BaseException:
            self.stop()
            raise

    def jwt_svid(self, audience: str) -> str:
        with WorkloadApiClient(socket_path=self.agent.endpoint, default_timeout=10) as c:
            return c.fetch_jwt_svid(audience={audience}, subject=CONSOLE).token

    def dpop_token(self, key: DpopKey, **extra) -> httpx.Response:
        with httpx.Client(verify=self.anon, timeout=10) as c:
            return c.post(self.token_url, headers={"DPoP": key.proof("POST", self.token_url)}, data={
                "grant_type": "client_credentials", "resource": "model-gw",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.jwt_svid(self.token_url), **extra})

    def call(self, token: str, proof: str | None, scheme: str = "DPoP", ctx=None) -> httpx.Response:
        headers = {"authorization": f"{scheme} {token}"}
        if proof:
            headers["DPoP"] = proof
        with httpx.Client(verify=ctx or self.anon, timeout=10) as c:
            return c.post(self.chat_url, headers=headers, json=BODY)

    def stop(self):
        for p in reversed(self.parts):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("dpop"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bound(stack):
    """A DPoP key and the DPoP-bound token issued for it."""
    key = DpopKey()
    r = stack.dpop_token(key)
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "DPoP"
    token = r.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": key.jkt} and claims["sub"] == CONSOLE
    return key, token


def refused_proof(r: httpx.Response, error="invalid_dpop_proof"):
    assert r.status_code == 401, r.text
    challenges = r.headers.get_list("www-authenticate")
    assert any(c.startswith("DPoP ") and f'error="{error}"' in c for c in challenges), challenges


def test_a_dpop_client_without_a_certificate_is_served_and_audited(stack, bound):
    key, token = bound
    r = stack.call(token, key.proof("POST", stack.chat_url, token))
    assert r.status_code == 200, r.text
    rec = [a for a in stack.proxy.audit() if a["decision"] == "allow"][-1]
    assert rec["spiffe_id"] == CONSOLE and rec["cert_thumbprint"] == ""


def test_the_authority_refuses_an_assertion_client_without_a_proof(stack):
    with httpx.Client(verify=stack.anon, timeout=10) as c:
        r = c.post(stack.token_url, data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": stack.jwt_svid(stack.token_url)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    # And a proof for another URL at the token endpoint.
    with httpx.Client(verify=stack.anon, timeout=10) as c:
        r = c.post(stack.token_url, headers={"DPoP": DpopKey().proof("POST", stack.chat_url)}, data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": stack.jwt_svid(stack.token_url)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_dpop_proof", r.text


def test_refuses_a_proof_for_another_method(stack, bound):
    key, token = bound
    refused_proof(stack.call(token, key.proof("GET", stack.chat_url, token)))


def test_refuses_a_proof_for_another_url(stack, bound):
    key, token = bound
    refused_proof(stack.call(token, key.proof("POST", f"{stack.proxy.url}/v1/models", token)))


def test_refuses_a_reused_jti(stack, bound):
    key, token = bound
    proof = key.proof("POST", stack.chat_url, token)
    assert stack.call(token, proof).status_code == 200
    refused_proof(stack.call(token, proof))


def test_refuses_a_stale_iat(stack, bound):
    key, token = bound
    refused_proof(stack.call(token, key.proof("POST", stack.chat_url, token,
                                              iat=int(time.time()) - 300)))


def test_refuses_a_proof_signed_by_another_key(stack, bound):
    _, token = bound
    thief = DpopKey()
    refused_proof(stack.call(token, thief.proof("POST", stack.chat_url, token)))


def test_refuses_ath_for_another_token(stack, bound):
    key, token = bound
    refused_proof(stack.call(token, key.proof("POST", stack.chat_url, ath_of="another token")))


def test_refuses_a_dpop_token_without_its_proof(stack, bound):
    key, token = bound
    refused_proof(stack.call(token, None))
    # Nor as a plain bearer token.
    r = stack.call(token, key.proof("POST", stack.chat_url, token), scheme="Bearer")
    assert r.status_code == 401, r.text


def test_refuses_a_certificate_bound_token_without_its_certificate(stack):
    token = stack.console.token("model-gw")
    # With its certificate it is served...
    assert stack.call(token, None, scheme="Bearer", ctx=stack.console.ctx).status_code == 200
    # ...without, refused.
    r = stack.call(token, None, scheme="Bearer")
    assert r.status_code == 401, r.text
    assert "without its certificate" in r.json()["error"]["message"]


def test_a_nonce_is_required_when_configured(stack, bound, tmp_path):
    key, token = bound
    proxy = Proxy(stack.server, stack.agent, tmp_path, stack.model.url, POLICY,
                  extra=["--dpop", "--dpop-nonce"])
    try:
        proxy.wait_ready(stack.console.ctx)
        url = f"{proxy.url}/v1/chat/completions"
        with httpx.Client(verify=stack.anon, timeout=10) as c:
            def call(proof):
                return c.post(url, json=BODY, headers={"authorization": f"DPoP {token}",
                                                       "DPoP": proof})
            r = call(key.proof("POST", url, token))
            refused_proof(r, "use_dpop_nonce")
            nonce = r.headers["dpop-nonce"]
            assert call(key.proof("POST", url, token, nonce="not-the-nonce")).status_code == 401
            r = call(key.proof("POST", url, token, nonce=nonce))
            assert r.status_code == 200, r.text
    finally:
        proxy.stop()


def test_the_mcp_client_finds_the_authorization_server_from_the_proxys_401(stack):
    """The `mcp` package's OAuthClientProvider (RFC 9728 / RFC 8414 discovery, as the MCP
    authorization spec requires) against the proxy: it reads the 401's `resource_metadata`,
    fetches the protected resource metadata, then the authority's metadata. (It then tries
    dynamic client registration, which sigil does not offer: workloads are registered by
    entries, so the flow stops there.)"""
    import httpx2
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import OAuthClientMetadata

    class Memory:
        def __init__(self):
            self.tokens, self.client = None, None

        async def get_tokens(self):
            return self.tokens

        async def set_tokens(self, tokens):
            self.tokens = tokens

        async def get_client_info(self):
            return self.client

        async def set_client_info(self, info):
            self.client = info

    server_url = f"{stack.proxy.url}/mcp"
    provider = OAuthClientProvider(
        server_url=server_url,
        client_metadata=OAuthClientMetadata(redirect_uris=["http://127.0.0.1:1/callback"],
                                            client_name="sigil-interop"),
        storage=Memory())
    seen = []

    async def record(response):
        seen.append((response.request.method, str(response.request.url), response.status_code,
                     response.headers.get_list("www-authenticate")))

    async def run():
        async with httpx2.AsyncClient(verify=stack.anon, auth=provider, timeout=10,
                                      event_hooks={"response": [record]}) as c:
            with pytest.raises(Exception):
                await c.post(server_url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                               "params": {}})

    asyncio.run(run())
    first = seen[0]
    assert first[0] == "POST" and first[2] == 401
    metadata_url = f"{stack.proxy.url}/.well-known/oauth-protected-resource"
    assert any(f'resource_metadata="{metadata_url}"' in c and c.startswith("Bearer ")
               for c in first[3]), first
    assert any(c.startswith("DPoP algs=") for c in first[3]), first
    assert ("GET", metadata_url, 200) in [s[:3] for s in seen], seen
    as_url = f"{stack.server.url}/.well-known/oauth-authorization-server"
    assert ("GET", as_url, 200) in [s[:3] for s in seen], seen
    prm = provider.context.protected_resource_metadata
    assert [str(u).rstrip("/") for u in prm.authorization_servers] == [stack.server.url]
    assert str(provider.context.auth_server_url).rstrip("/") == stack.server.url
    # The document it fetched is the authority's RFC 8414 metadata. (The SDK's model insists
    # on an authorization_endpoint, which sigil has none of: it serves no user login, so the
    # SDK does not keep the document; see docs/delegation.md.)
    with httpx.Client(verify=stack.anon, timeout=10) as c:
        asm = c.get(as_url).json()
    assert asm["issuer"] == stack.server.url
    assert asm["token_endpoint"] == f"{stack.server.url}/oauth2/token"
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in asm["grant_types_supported"]
    assert "ES256" in asm["dpop_signing_alg_values_supported"]
