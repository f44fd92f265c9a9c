"""SIEM export over OTLP: a real `sigil proxy` (agent mode, in front of `sigil demo-model`)
exports its audit records as OpenTelemetry log records (OTLP/HTTP, JSON encoding) to a small
receiver here that parses every body with the official `opentelemetry-proto` messages
(`google.protobuf.json_format.Parse` into `ExportLogsServiceRequest`, which refuses unknown
fields and wrong types), then checks the records of an allowed and a denied request.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from conftest import TD, Agent, Proxy, Sigil, Workload, demo_model, register, wait_for

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


class OtlpReceiver:
    """An OTLP/HTTP logs receiver on loopback: every POST body is parsed as an
    `ExportLogsServiceRequest` (protobuf JSON mapping); what did not parse is kept too."""

    def __init__(self):
        self.requests = []  # (path, headers, ExportLogsServiceRequest)
        self.errors = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    msg = json_format.Parse(body, ExportLogsServiceRequest())
                    receiver.requests.append((self.path, dict(self.headers), msg))
                    status, out = 200, b"{}"
                except Exception as e:  # noqa: BLE001 - any parse failure is a test failure
                    receiver.errors.append(f"{e}: {body[:500]!r}")
                    status, out = 400, json.dumps({"message": str(e)}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def log_records(self):
        return [(rl.resource, rec)
                for _, _, msg in self.requests
                for rl in msg.resource_logs
                for sl in rl.scope_logs
                for rec in sl.log_records]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def value(any_value):
    """A Python value of an OTLP AnyValue."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


def attributes(kvs) -> dict:
    return {kv.key: value(kv.value) for kv in kvs}


@pytest.fixture()
def stack(tmp_path, monkeypatch):
    # The standard OTel variables reach the proxy through its environment.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gw")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=floor%203")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "host.name=cam-3")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", raising=False)
    server = Sigil(tmp_path)
    parts = []
    try:
        agent = Agent(server, tmp_path)
        parts.append(agent)
        register(server, agent, "proxy", dns=["localhost"], enforcer=True)
        register(server, agent, "floor/camera", groups=["factory-floor"], scopes=["model:invoke"])
        model = demo_model(server, tmp_path)
        parts.append(model)
        receiver = OtlpReceiver()
        parts.append(receiver)
        # The flag is the base URL; the proxy posts to <base>/v1/logs.
        proxy = Proxy(server, agent, tmp_path, model.url, POLICY,
                      extra=["--audit-otlp-endpoint", receiver.url])
        parts.append(proxy)
        camera = Workload(server, agent, tmp_path, CAMERA)
        proxy.wait_ready(camera.ctx)
        yield proxy, camera, receiver
    finally:
        for p in reversed(parts):
            p.stop()
        server.stop()


def chat(proxy, who, model):
    with httpx.Client(verify=who.ctx, timeout=20) as c:
        return c.post(f"{proxy.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {who.token()}"},
                      json={"model": model, "messages": [{"role": "user", "content": "frame 7"}]})


def test_audit_records_reach_an_otlp_receiver_as_valid_log_records(stack):
    proxy, camera, receiver = stack
    started = time.time_ns()
    assert chat(proxy, camera, "defect-detector").status_code == 200
    assert chat(proxy, camera, "line-controller").status_code == 403

    # Batched for up to a second, then posted.
    wait_for(lambda: len(receiver.log_records()) >= 2 or receiver.errors, 15,
             "two OTLP log records")
    assert not receiver.errors, receiver.errors
    records = receiver.log_records()
    assert len(records) == 2, records
    for path, headers, _ in receiver.requests:
        assert path == "/v1/logs"
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["content-type"] == "application/json"
        assert lowered["x-tenant"] == "floor 3"

    audit = {r["request_id"]: r for r in proxy.audit()}
    assert len(audit) == 2
    by_outcome = {}
    for resource, rec in records:
        res = attributes(resource.attributes)
        assert res["service.name"] == "edge-gw"
        assert res["host.name"] == "cam-3"
        attrs = attributes(rec.attributes)
        by_outcome[attrs["event.outcome"]] = (rec, attrs)
        # Every exported record is a durable one, with its fields.
        seg = audit[attrs["event.id"]]
        assert attrs["user.id"] == attrs["source.user.id"] == CAMERA
        assert attrs["sigil.cert_thumbprint"] == seg["cert_thumbprint"]
        assert len(attrs["tls.client.hash.sha256"]) == 64
        assert attrs["sigil.token.jti"] == seg["jti"]
        assert attrs["event.kind"] == "event"
        assert attrs["event.category"] == ["iam"]
        assert attrs["event.action"] == "invoke"
        assert attrs["event.reason"] == seg["reason"]
        assert attrs["http.request.method"] == "POST"
        assert attrs["url.path"] == "/v1/chat/completions"
        assert attrs["sigil.resource.type"] == "Model"
        assert attrs["sigil.call_count"] == 1
        assert rec.time_unix_nano == seg["time_ms"] * 1_000_000
        assert started - 5_000_000_000 < rec.time_unix_nano < time.time_ns() + 5_000_000_000

    allowed, a = by_outcome["success"]
    assert allowed.severity_number == SeverityNumber.SEVERITY_NUMBER_INFO
    assert allowed.severity_text == "INFO"
    assert a["event.type"] == ["allowed"]
    assert a["sigil.decision"] == "allow"
    assert a["sigil.resource.id"] == "defect-detector"
    assert a["sigil.policy_ids"] == ["floor-defect-detector"]
    assert allowed.body.string_value.startswith(f"allow {CAMERA} invoke Model::\"defect-detector\"")

    denied, d = by_outcome["failure"]
    assert denied.severity_number == SeverityNumber.SEVERITY_NUMBER_WARN
    assert denied.severity_text == "WARN"
    assert d["event.type"] == ["denied"]
    assert d["sigil.decision"] == "deny"
    assert d["sigil.resource.id"] == "line-controller"
    assert denied.body.string_value.startswith("deny ")
