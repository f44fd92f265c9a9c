"""The metrics listeners (`--metrics-addr`) of a real server, agent and proxy, scraped after a
scripted run and parsed with the pinned `prometheus_client` parsers (Prometheus text and the
stricter OpenMetrics one): counters match the requests made (7 allowed, 3 denied by policy)."""
import httpx
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import TD, Agent, Proxy, Sigil, Workload, demo_model, free_port, register

POLICY = """
@id("floor-defect-detector")
permit (principal in Group::"factory-floor", action == Action::"invoke",
        resource == Model::"defect-detector")
when { context.scopes.contains("model:invoke") };
"""


def scrape(addr: str) -> dict:
    """{(sample name, sorted labels): value}, parsed by both parsers (which must agree)."""
    r = httpx.get(f"http://{addr}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    strict = {}
    for family in openmetrics_families(r.text):
        for s in family.samples:
            strict[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert strict == samples
    return samples


def ready(addr: str) -> int:
    return httpx.get(f"http://{addr}/readyz", timeout=10).status_code


def test_metrics_of_server_agent_and_proxy(tmp_path, monkeypatch):
    server_addr, agent_addr, proxy_addr = (f"127.0.0.1:{free_port()}" for _ in range(3))
    # The fixtures take no extra flags for the server and agent: `SIGIL_<KEY>` configures them.
    monkeypatch.setenv("SIGIL_METRICS_ADDR", server_addr)
    server = Sigil(tmp_path)
    parts = [server]
    try:
        monkeypatch.setenv("SIGIL_METRICS_ADDR", agent_addr)
        agent = Agent(server, tmp_path)
        parts.append(agent)
        monkeypatch.delenv("SIGIL_METRICS_ADDR")
        register(server, agent, "proxy", dns=["localhost"], enforcer=True)
        camera_id = register(server, agent, "floor/camera", groups=["factory-floor"],
                             scopes=["model:invoke"])
        model = demo_model(server, tmp_path)
        parts.append(model)
        proxy = Proxy(server, agent, tmp_path, model.url, POLICY,
                      extra=["--metrics-addr", proxy_addr])
        parts.append(proxy)
        camera = Workload(server, agent, tmp_path, camera_id)
        proxy.wait_ready(camera.ctx)
        token = camera.token()

        with httpx.Client(verify=camera.ctx, timeout=20,
                          headers={"authorization": f"Bearer {token}"}) as c:
            for model_name, want, n in (("defect-detector", 200, 7), ("other-model", 403, 3)):
                for _ in range(n):
                    r = c.post(f"{proxy.url}/v1/chat/completions",
                               json={"model": model_name,
                                     "messages": [{"role": "user", "content": "hi"}]})
                    assert r.status_code == want, r.text

        p = scrape(proxy_addr)
        req = lambda d, why: p[("sigil_proxy_requests_total",
                                (("decision", d), ("reason", why)))]
        assert req("allow", "policy") == 7
        assert req("deny", "policy") == 3
        assert req("deny", "bad_token") == 0
        assert p[("sigil_proxy_request_duration_seconds_count", ())] == 7
        assert p[("sigil_proxy_policy_evaluation_seconds_count", ())] == 10
        assert p[("sigil_proxy_svid_expiry_seconds", ())] > 0
        assert ready(proxy_addr) == 200

        a = scrape(agent_addr)
        assert a[("sigil_agent_sync_connected", ())] == 1
        assert a[("sigil_agent_node_svid_expiry_seconds", ())] > 0
        # The proxy's and the camera's SVIDs.
        assert a[("sigil_agent_workload_svids", ())] == 2
        fetched = a[("sigil_agent_workload_api_requests_total",
                     (("method", "FetchX509SVID"), ("result", "ok")))]
        assert fetched >= 2
        assert ready(agent_addr) == 200

        s = scrape(server_addr)
        assert s[("sigil_server_token_requests_total", (("result", "ok"),))] == 1
        assert s[("sigil_server_connected_agents", ())] == 1
        assert s[("sigil_server_node_api_requests_total",
                  (("method", "Attest"), ("result", "ok")))] == 1
        assert s[("sigil_server_store_up", ())] == 1
        assert ready(server_addr) == 200
        assert httpx.get(f"http://{server_addr}/healthz", timeout=10).status_code == 200
    finally:
        for part in reversed(parts):
            part.stop()
