"""SIEM export over OTLP: a real `sigil proxy` (agent mode, in front of `sigil demo-model`)
exports its audit records as OpenTelemetry log records to a real receiver here, over OTLP/HTTP
with protobuf bodies (gzip) and over OTLP/gRPC, which parses every request with the official
`opentelemetry-proto` messages, then checks the records of an allowed and a denied request and
the export counters on `/metrics`.
"""
import time

import httpx
import pytest
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from conftest import TD, Agent, Proxy, Sigil, Workload, demo_model, free_port, register, wait_for
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


def log_records(receiver):
    return [(rl.resource, rec)
            for _, _, msg in receiver.requests
            for rl in msg.resource_logs
            for sl in rl.scope_logs
            for rec in sl.log_records]


@pytest.fixture(params=["http/protobuf", "grpc"])
def stack(tmp_path, monkeypatch, request):
    protocol = request.param
    # The standard OTel variables reach the proxy through its environment.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip" if protocol != "grpc" else "none")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "200")
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
        receiver = OtlpReceiver("logs", protocol)
        parts.append(receiver)
        # The flag is the base URL; over HTTP the proxy posts to <base>/v1/logs.
        metrics = f"127.0.0.1:{free_port()}"
        proxy = Proxy(server, agent, tmp_path, model.url, POLICY,
                      extra=["--audit-otlp-endpoint", receiver.url, "--metrics-addr", metrics])
        proxy.metrics_url = f"http://{metrics}"
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

    # Batched (OTEL_BLRP_SCHEDULE_DELAY), then sent.
    wait_for(lambda: len(log_records(receiver)) >= 2 or receiver.errors, 15,
             "two OTLP log records")
    assert not receiver.errors, receiver.errors
    records = log_records(receiver)
    assert len(records) == 2, records
    for path, headers, _ in receiver.requests:
        assert headers["x-tenant"] == "floor 3"
        if receiver.protocol == "grpc":
            # Received by grpcio's server: a gRPC request, decoded by the service's types.
            assert path == "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
        else:
            assert path == "/v1/logs"
            assert headers["content-type"] == "application/x-protobuf"
            assert headers["content-encoding"] == "gzip"

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

    # What was exported is counted on /metrics, and nothing was dropped.
    text = httpx.get(f"{proxy.metrics_url}/metrics", timeout=5).text
    assert 'sigil_proxy_telemetry_exported_total{signal="logs"} 2' in text, text
    assert 'sigil_proxy_telemetry_dropped_total{signal="logs",reason="export_failed"} 0' in text
