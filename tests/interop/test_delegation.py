"""Agents acting for people (RFC 8693 token exchange): a real OpenID provider (the npm package
`oidc-provider`, run by Node) logs users in and mints their access tokens; real workloads
exchange them at a real `sigil server` over mTLS, hop after hop; a real `sigil proxy` in front
of `sigil demo-model` decides with the user and the chain in `context.delegation`.

Workloads: triage (acts for clinicians), summarizer (acts only through triage), relay (acts
for anyone), rogue (acts for no one). The authority allows chains of at most 2."""
import base64
import hashlib
import json
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import TD, Agent, IdP, Proxy, Sigil, Workload, demo_model, register

TRIAGE = f"spiffe://{TD}/triage"
SUMMARIZER = f"spiffe://{TD}/summarizer"
RELAY = f"spiffe://{TD}/relay"
ROGUE = f"spiffe://{TD}/rogue"

# Decided by the trust authority at each exchange.
ACT_FOR = f"""
@id("triage-acts-for-clinicians")
permit (principal == Workload::"{TRIAGE}", action == Action::"act_for", resource)
when {{ context has delegation && context.delegation.groups.contains("clinicians") }};

@id("summarizer-acts-through-triage")
permit (principal == Workload::"{SUMMARIZER}", action == Action::"act_for", resource)
when {{ context has delegation && context.delegation.chain.contains("{TRIAGE}") }};

@id("relay-acts-for-anyone")
permit (principal == Workload::"{RELAY}", action == Action::"act_for", resource);
"""

# Decided by the proxy on every call.
PROXY_POLICY = f"""
@id("triage-invokes-for-clinicians-directly")
permit (principal == Workload::"{TRIAGE}", action == Action::"invoke",
        resource == Model::"line-assistant")
when {{ context has delegation && context.delegation.groups.contains("clinicians") &&
        context.delegation.depth == 1 }};

@id("summarizer-invokes-through-triage")
permit (principal == Workload::"{SUMMARIZER}", action == Action::"invoke",
        resource == Model::"line-assistant")
when {{ context has delegation && context.delegation.chain.contains("{TRIAGE}") &&
        context.delegation.depth == 2 }};
"""

SCOPES = ["tool:call", "model:invoke"]


def claims(token: str) -> dict:
    p = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))


def x5t(w: Workload) -> str:
    der = x509.load_pem_x509_certificate(w.cert.read_bytes()).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class Stack:
    def __init__(self, root):
        self.parts = []
        try:
            self.idp = IdP(root)
            self.parts.append(self.idp)
            self.server = Sigil(root, config=f"""
max_delegation_depth = 2

[[external_issuers]]
issuer = "{self.idp.issuer}"
jwks_uri = "{self.idp.jwks_uri}"
audience = "urn:sigil"
""")
            self.parts.append(self.server)
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            for name in ("triage", "summarizer", "relay", "rogue"):
                register(self.server, self.agent, name, groups=["agents"], scopes=SCOPES)
            policies = root / "act-for"
            policies.mkdir()
            (policies / "act_for.cedar").write_text(ACT_FOR)
            self.server.admin("policy", "push", str(policies))
            self.model = demo_model(self.server, root)
            self.parts.append(self.model)
            self.proxy = Proxy(self.server, self.agent, root, self.model.url, PROXY_POLICY)
            self.parts.append(self.proxy)
            self.w = {n: Workload(self.server, self.agent, root, f"spiffe://{TD}/{n}")
                      for n in ("triage", "summarizer", "relay", "rogue")}
            self.proxy.wait_ready(self.w["triage"].ctx)
        except BaseException:
            self.stop()
            raise

    def exchange_ok(self, who: str, subject: str, resource: str, **extra) -> str:
        r = self.w[who].exchange(subject, resource, **extra)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "Bearer"
        assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
        assert r.headers["cache-control"] == "no-store"
        return body["access_token"]

    def invoke(self, who: str, token: str) -> httpx.Response:
        with httpx.Client(verify=self.w[who].ctx, timeout=10) as c:
            return c.post(self.proxy.url + "/v1/chat/completions",
                          headers={"authorization": f"Bearer {token}"},
                          json={"model": "line-assistant",
                                "messages": [{"role": "user", "content": "status?"}]})

    def stop(self):
        for p in reversed(self.parts):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("delegation"))
    yield s
    s.stop()


def refused(r: httpx.Response, error: str, status: int = 400) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"] == error, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()["error_description"]


def test_two_hops_carry_the_user_and_the_chain_to_policy_and_audit(stack):
    alice = stack.idp.user_token("alice", scope="openid tool:call model:invoke")
    assert claims(alice)["iss"] == stack.idp.issuer  # minted by the provider
    # Hop 1: triage acts for alice, towards the summarizer (its SPIFFE ID is the audience).
    t1 = stack.exchange_ok("triage", alice, SUMMARIZER)
    c1 = claims(t1)
    assert c1["sub"] == "alice" and c1["act"] == {"sub": TRIAGE}
    assert c1["client_id"] == TRIAGE and c1["aud"] == [SUMMARIZER]
    assert c1["user_groups"] == ["clinicians"]
    assert c1["cnf"] == {"x5t#S256": x5t(stack.w["triage"])}
    assert set(c1["scope"].split()) == {"tool:call", "model:invoke"}
    assert c1["exp"] <= claims(alice)["exp"]
    # Hop 2: the summarizer acts for alice through triage, towards the model gateway.
    t2 = stack.exchange_ok("summarizer", t1, "model-gw")
    c2 = claims(t2)
    assert c2["sub"] == "alice"
    assert c2["act"] == {"sub": SUMMARIZER, "act": {"sub": TRIAGE}}
    assert c2["cnf"] == {"x5t#S256": x5t(stack.w["summarizer"])}
    assert c2["exp"] <= c1["exp"]
    r = stack.invoke("summarizer", t2)
    assert r.status_code == 200, r.text
    # Directly: triage for alice, depth 1.
    direct = stack.exchange_ok("triage", alice, "model-gw")
    r = stack.invoke("triage", direct)
    assert r.status_code == 200, r.text
    records = [a for a in stack.proxy.audit() if a.get("user") == "alice"]
    assert any(a["chain"] == [SUMMARIZER, TRIAGE] and a["decision"] == "allow"
               and a["spiffe_id"] == SUMMARIZER for a in records), records
    assert any(a["chain"] == [TRIAGE] and a["decision"] == "allow" for a in records), records


def test_policy_on_the_chain_refuses_a_relayed_call(stack):
    alice = stack.idp.user_token("alice", scope="openid model:invoke")
    # relay acts for alice towards triage; triage then acts for alice through relay.
    t1 = stack.exchange_ok("relay", alice, TRIAGE)
    t2 = stack.exchange_ok("triage", t1, "model-gw")
    assert claims(t2)["act"] == {"sub": TRIAGE, "act": {"sub": RELAY}}
    # The proxy lets triage invoke only when it acts directly for the user.
    r = stack.invoke("triage", t2)
    assert r.status_code == 403, r.text
    denied = [a for a in stack.proxy.audit() if a.get("chain") == [TRIAGE, RELAY]]
    assert denied and denied[-1]["decision"] == "deny", denied


def test_refuses_a_subject_token_from_an_unconfigured_issuer(stack, tmp_path):
    other = IdP(tmp_path)
    try:
        foreign = other.user_token("alice")
    finally:
        other.stop()
    why = refused(stack.w["triage"].exchange(foreign, "model-gw"), "invalid_grant")
    assert "not trusted" in why


def test_refuses_an_expired_subject_token(stack):
    short = stack.idp.user_token("alice", resource="urn:sigil:short")
    assert claims(short)["exp"] - claims(short)["iat"] == 1
    time.sleep(2.2)
    why = refused(stack.w["triage"].exchange(short, "model-gw"), "invalid_grant")
    assert "expired" in why


def test_refuses_a_subject_token_for_another_audience(stack):
    other = stack.idp.user_token("alice", resource="urn:other-service")
    assert claims(other)["aud"] == "urn:other-service"
    why = refused(stack.w["triage"].exchange(other, "model-gw"), "invalid_grant")
    assert "audience" in why


def test_scopes_are_narrowed_and_refused_when_nothing_remains(stack):
    # alice's token carries tool:call only; triage may have tool:call and model:invoke.
    alice = stack.idp.user_token("alice", scope="openid tool:call")
    t = stack.exchange_ok("triage", alice, "model-gw", scope="tool:call model:invoke")
    assert claims(t)["scope"] == "tool:call"
    why = refused(stack.w["triage"].exchange(alice, "model-gw", scope="model:invoke"),
                  "invalid_scope")
    assert "no scope remains" in why


def test_refuses_a_chain_longer_than_the_maximum(stack):
    alice = stack.idp.user_token("alice", scope="openid model:invoke")
    t1 = stack.exchange_ok("triage", alice, SUMMARIZER)
    t2 = stack.exchange_ok("summarizer", t1, RELAY)
    why = refused(stack.w["relay"].exchange(t2, "model-gw"), "invalid_grant")
    assert "at most 2" in why


def test_refuses_a_workload_not_allowed_to_act_for_the_user(stack):
    bob = stack.idp.user_token("bob", scope="openid model:invoke")
    # triage acts for clinicians only; bob is a visitor.
    refused(stack.w["triage"].exchange(bob, "model-gw"), "unauthorized_client")
    # rogue acts for no one.
    alice = stack.idp.user_token("alice", scope="openid model:invoke")
    why = refused(stack.w["rogue"].exchange(alice, "model-gw"), "unauthorized_client")
    assert "act for" in why
    # summarizer only through triage, never directly.
    refused(stack.w["summarizer"].exchange(alice, "model-gw"), "unauthorized_client")


def test_refuses_an_exchanged_token_replayed_from_another_certificate(stack):
    alice = stack.idp.user_token("alice", scope="openid model:invoke")
    t = stack.exchange_ok("triage", alice, "model-gw")
    assert stack.invoke("triage", t).status_code == 200
    # The summarizer got hold of triage's token: bound to triage's certificate, refused.
    r = stack.invoke("summarizer", t)
    assert r.status_code == 401, r.text
    # Nor can it exchange it: the token was not sent to it (audience).
    refused(stack.w["summarizer"].exchange(t, "model-gw"), "invalid_grant")
