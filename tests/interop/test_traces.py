"""Traces over OTLP: a real `sigil proxy` (agent mode) in front of a small upstream that records
the headers it gets exports a trace per request, over OTLP/HTTP with protobuf bodies and over
OTLP/gRPC, to a real receiver here that parses every request with the official
`opentelemetry-proto` messages. The trace continues the client's W3C `traceparent`, and its id
is the one the upstream received.
"""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import TD, Agent, Proxy, Sigil, Workload, register, wait_for
from otlp_receiver import OtlpReceiver, attributes

POLICY = """
@id("floor-defect-detector")
permit (
  principal in Group::"factory-floor",
  action == Action::"invoke",
  resource == Model::"defect-detector"
)
when { context.scopes.contains("model:invoke") };
"""

CAMERA = f"spiffe://{TD}/floor/camera"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Server:
    """A loopback HTTP server with `handler` as its POST handler."""

    def __init__(self, handler):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, out = handler(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def spans_of(receiver):
    return [(rs.resource, span)
            for _, _, msg in receiver.requests
            for rs in msg.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans]


class RecordingUpstream(Server):
    """An OpenAI-style upstream answering every call; keeps each request's headers."""

    def __init__(self):
        self.seen = []

        def handle(path, headers, body):
            self.seen.append({k.lower(): v for k, v in headers.items()})
            out = {"id": "c1", "object": "chat.completion", "model": "defect-detector",
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "ok"}}]}
            return 200, json.dumps(out).encode()

        super().__init__(handle)


@pytest.fixture(params=["http/protobuf", "grpc"])
def stack(tmp_path, monkeypatch, request):
    protocol = request.param
    # Only the standard variables turn traces on (no flag), and not the audit log export.
    for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
              "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER",
              "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_HEADERS"):
        monkeypatch.delenv(v, raising=False)
    receiver = OtlpReceiver("traces", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                       receiver.url + ("/v1/traces" if protocol != "grpc" else ""))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=floor%203")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gw")
    server = Sigil(tmp_path)
    parts = [receiver]
    try:
        agent = Agent(server, tmp_path)
        parts.append(agent)
        register(server, agent, "proxy", dns=["localhost"], enforcer=True)
        register(server, agent, "floor/camera", groups=["factory-floor"], scopes=["model:invoke"])
        upstream = RecordingUpstream()
        parts.append(upstream)
        proxy = Proxy(server, agent, tmp_path, upstream.url, POLICY)
        parts.append(proxy)
        camera = Workload(server, agent, tmp_path, CAMERA)
        proxy.wait_ready(camera.ctx)
        yield proxy, camera, upstream, receiver
    finally:
        for p in reversed(parts):
            p.stop()
        server.stop()


def chat(proxy, who, token, model, headers=None):
    with httpx.Client(verify=who.ctx, timeout=20) as c:
        return c.post(f"{proxy.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {token}", **(headers or {})},
                      json={"model": model, "messages": [{"role": "user", "content": "frame 7"}]})


def trace_of(receiver, trace_id: str, n: int):
    """The `n` spans of `trace_id` (hex) once they arrived, by name."""
    tid = bytes.fromhex(trace_id)

    def got():
        assert not receiver.errors, receiver.errors
        spans = [s for _, s in spans_of(receiver) if s.trace_id == tid]
        return spans if len(spans) >= n else None

    spans = wait_for(got, 15, f"{n} spans of trace {trace_id}")
    assert len(spans) == n, spans
    return spans


def test_a_request_is_traced_and_the_trace_reaches_the_upstream(stack):
    proxy, camera, upstream, receiver = stack
    token = camera.token()
    client_tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    r = chat(proxy, camera, token, "defect-detector",
             {"traceparent": client_tp, "tracestate": "vendor=abc"})
    assert r.status_code == 200, r.text
    # What the upstream received: the client's trace, the proxy's span as parent.
    sent = upstream.seen[-1]
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", sent["traceparent"])
    assert m, sent["traceparent"]
    assert m.group(1) == CLIENT_TRACE
    assert m.group(2) != CLIENT_SPAN
    assert sent["tracestate"] == "vendor=abc"

    spans = trace_of(receiver, m.group(1), 4)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"sigil.proxy.request", "sigil.token.validate",
                            "sigil.policy.evaluate", "sigil.upstream"}
    root = by_name["sigil.proxy.request"]
    assert root.kind == Span.SPAN_KIND_SERVER
    assert root.parent_span_id == bytes.fromhex(CLIENT_SPAN)
    assert root.trace_state == "vendor=abc"
    a = attributes(root.attributes)
    assert a["sigil.spiffe_id"] == CAMERA
    assert a["sigil.action"] == "invoke"
    assert a["sigil.resource.type"] == "Model"
    assert a["sigil.resource.id"] == "defect-detector"
    assert a["sigil.decision"] == "allow"
    assert a["sigil.reason"] == "permitted by policy"
    assert a["sigil.policy_ids"] == ["floor-defect-detector"]
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["sigil.request_id"] == sent["x-sigil-request-id"]
    assert a["sigil.token.jti"]
    assert root.status.code == Status.STATUS_CODE_UNSET
    for child in spans:
        if child is not root:
            assert child.parent_span_id == root.span_id, child.name
            assert root.start_time_unix_nano <= child.start_time_unix_nano
            assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    up = by_name["sigil.upstream"]
    assert up.kind == Span.SPAN_KIND_CLIENT
    assert up.span_id == bytes.fromhex(m.group(2)), "the upstream's parent is the upstream span"
    assert attributes(up.attributes)["http.response.status_code"] == 200
    pol = attributes(by_name["sigil.policy.evaluate"].attributes)
    assert (pol["sigil.action"], pol["sigil.resource.id"], pol["sigil.decision"]) == \
        ("invoke", "defect-detector", "allow")
    assert attributes(by_name["sigil.token.validate"].attributes)["sigil.token.cache"] == "miss"
    for path, headers, msg in receiver.requests:
        if receiver.protocol == "grpc":
            assert path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        else:
            assert path == "/v1/traces"
            assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-tenant"] == "floor 3"
        res = attributes(msg.resource_spans[0].resource.attributes)
        assert res["service.name"] == "edge-gw"
    # The token itself is in no span.
    assert all(token not in str(s) for _, s in spans_of(receiver))

    # The same token again, with an invalid traceparent: a new trace, the client's
    # tracestate dropped, and the token served from the cache.
    r = chat(proxy, camera, token, "defect-detector",
             {"traceparent": f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
              "tracestate": "vendor=abc"})
    assert r.status_code == 200, r.text
    sent = upstream.seen[-1]
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", sent["traceparent"])
    assert m and m.group(1) != CLIENT_TRACE, sent["traceparent"]
    assert "tracestate" not in sent
    spans = trace_of(receiver, m.group(1), 4)
    root = next(s for s in spans if s.name == "sigil.proxy.request")
    assert root.parent_span_id == b""
    tok = next(s for s in spans if s.name == "sigil.token.validate")
    assert attributes(tok.attributes)["sigil.token.cache"] == "hit"


def test_a_denied_request_is_traced_without_an_upstream_span(stack):
    proxy, camera, upstream, receiver = stack
    r = chat(proxy, camera, camera.token(), "line-controller",
             {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 403
    assert upstream.seen == []
    spans = trace_of(receiver, CLIENT_TRACE, 3)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"sigil.proxy.request", "sigil.token.validate",
                            "sigil.policy.evaluate"}
    a = attributes(by_name["sigil.proxy.request"].attributes)
    assert a["sigil.decision"] == "deny"
    assert a["sigil.resource.id"] == "line-controller"
    assert a["http.response.status_code"] == 403
    assert a["sigil.reason"].startswith("policy denies invoke")
    pol = attributes(by_name["sigil.policy.evaluate"].attributes)
    assert pol["sigil.decision"] == "deny"
