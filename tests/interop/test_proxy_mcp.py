"""The official MCP Python SDK (pinned `mcp`): a real MCP server (tests/interop/mcp_server.py)
behind a real `sigil proxy` in agent mode, a real MCP client in front. Tool listing is
filtered by policy, tool calls are decided per tool and per argument, JSON-RPC batches cannot
hide a forbidden call, and refusals come back as JSON-RPC error objects (HTTP 403/401), which
the SDK raises as `mcp.MCPError`. Run with the server answering in SSE and in JSON.
"""
import asyncio
import json

import httpx
import httpx2
import pytest
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

from conftest import TD, Agent, Proxy, Sigil, Workload, mcp_server, register

POLICY = """
// The MCP session itself: initialize, notifications, pings, and the SSE stream / session end.
@id("floor-mcp-session")
permit (principal in Group::"factory-floor", action == Action::"mcp", resource);

@id("floor-mcp-stream")
permit (principal in Group::"factory-floor", action == Action::"http", resource)
when { resource == Endpoint::"GET /mcp" || resource == Endpoint::"DELETE /mcp" };

@id("floor-list-tools")
permit (principal in Group::"factory-floor", action == Action::"list_tools", resource);

@id("floor-call-tools")
permit (principal in Group::"factory-floor", action == Action::"call_tool", resource)
unless { resource == Tool::"shutdown_line" };

@id("no-read-file-under-etc")
forbid (principal, action == Action::"call_tool", resource == Tool::"read_file")
when {
  context.arguments.hasTag("path") && context.arguments.getTag("path") like "/etc/*"
};
"""

CAMERA = f"spiffe://{TD}/floor/camera"
TIMEOUT = 60


class Stack:
    def __init__(self, root, json_response: bool):
        self.server = Sigil(root)
        self.parts = []
        try:
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            register(self.server, self.agent, "floor/camera", groups=["factory-floor"],
                     scopes=["model:invoke"])
            register(self.server, self.agent, "office/assistant", groups=["office"],
                     scopes=["model:invoke"])
            self.calls = root / "tool-calls.jsonl"
            self.mcp = mcp_server(root, self.calls, json_response=json_response)
            self.parts.append(self.mcp)
            self.proxy = Proxy(self.server, self.agent, root, self.mcp.url, POLICY,
                               mcp_path="/mcp")
            self.parts.append(self.proxy)
            self.camera = Workload(self.server, self.agent, root, CAMERA)
            self.office = Workload(self.server, self.agent, root, f"spiffe://{TD}/office/assistant")
            self.proxy.wait_ready(self.camera.ctx)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self):
        return f"{self.proxy.url}/mcp"

    def tool_calls(self) -> list:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines() if line]

    def stop(self):
        for p in reversed(self.parts):
            p.stop()
        self.server.stop()


@pytest.fixture(scope="module", params=["sse", "json"])
def stack(request, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp(f"proxy-mcp-{request.param}"),
              json_response=request.param == "json")
    yield s
    s.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def with_session(stack, who: Workload, body, token=None):
    """Runs `body(session)` in an initialized MCP session through the proxy as `who`."""
    token = token if token is not None else who.token()
    async with httpx2.AsyncClient(verify=who.ssl_context(), timeout=20,
                                  headers={"Authorization": f"Bearer {token}"}) as http:
        async with streamable_http_client(stack.url, http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=20) as session:
                await session.initialize()
                return await body(session)


def leaves(e: BaseException) -> list:
    """The exceptions inside (nested) exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in leaves(sub)]
    return [e]


def refused(coro) -> MCPError:
    """Runs `coro` expecting a refusal. A call refused inside a session raises a bare MCPError;
    one that ends the session (initialize refused) leaves the SDK's anyio task groups wrapped
    in ExceptionGroups (one per task group), so unwrap them."""
    try:
        run(coro)
    except BaseException as e:  # noqa: BLE001 - inspected, re-raised if not a refusal
        found = leaves(e)
        if not found or not all(isinstance(x, MCPError) for x in found):
            raise
        return found[0]
    raise AssertionError("not refused")


def assert_refused(e: MCPError):
    # The proxy's JSON-RPC error reached the SDK as is: a server-defined code (-32099..-32000),
    # not the SDK's stand-in for a non-JSON-RPC error body (-32603 "Server returned an error").
    assert -32099 <= e.code <= -32000, (e.code, e.message)
    assert e.message, e


def text(result) -> str:
    assert not result.is_error, result
    return "".join(c.text for c in result.content if c.type == "text")


def test_tool_list_shows_only_what_the_caller_may_call(stack):
    async def body(s):
        return sorted(t.name for t in (await s.list_tools()).tools)
    assert run(with_session(stack, stack.camera, body)) == ["read_file", "read_sensor"]


def test_permitted_tool_calls_reach_the_server(stack):
    async def body(s):
        return (text(await s.call_tool("read_sensor", {"line": 3})),
                text(await s.call_tool("read_file", {"path": "/data/x"})))
    sensor, content = run(with_session(stack, stack.camera, body))
    assert sensor.startswith("line 3:"), sensor
    assert content == "fake content of /data/x"
    calls = stack.tool_calls()
    assert {"tool": "read_sensor", "line": 3} in [{"tool": c["tool"], **c["arguments"]} for c in calls]


def test_read_file_under_etc_is_refused_by_argument(stack):
    async def body(s):
        with pytest.raises(MCPError) as e:
            await s.call_tool("read_file", {"path": "/etc/passwd"})
        assert_refused(e.value)
        # The session is still usable after a refusal.
        return text(await s.call_tool("read_file", {"path": "/data/ok"}))
    assert run(with_session(stack, stack.camera, body)) == "fake content of /data/ok"
    assert not [c for c in stack.tool_calls() if c["arguments"].get("path") == "/etc/passwd"]


def test_a_forbidden_tool_is_refused_and_never_reaches_the_server(stack):
    async def body(s):
        with pytest.raises(MCPError) as e:
            await s.call_tool("shutdown_line", {"line": 2})
        assert_refused(e.value)
    run(with_session(stack, stack.camera, body))
    assert "shutdown_line" not in [c["tool"] for c in stack.tool_calls()]


def test_a_batch_cannot_hide_a_forbidden_call(stack):
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "shutdown_line", "arguments": {"line": 1}}}]
    with httpx.Client(verify=stack.camera.ctx, timeout=20) as c:
        r = c.post(stack.url, json=batch, headers={
            "Authorization": f"Bearer {stack.camera.token()}",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-11-25"})
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/json")
    errors = r.json()
    assert isinstance(errors, list), errors
    assert sorted(e["id"] for e in errors) == [1, 2]
    for e in errors:
        assert e["jsonrpc"] == "2.0" and "result" not in e
        assert -32099 <= e["error"]["code"] <= -32000, e
        assert isinstance(e["error"]["message"], str)
    assert "shutdown_line" not in [c["tool"] for c in stack.tool_calls()]


def test_another_group_cannot_even_open_a_session(stack):
    async def body(s):
        raise AssertionError("the office workload got an MCP session")
    assert_refused(refused(with_session(stack, stack.office, body)))


def test_a_wrong_token_is_refused_with_a_jsonrpc_error(stack):
    # Through the SDK: initialize fails with the proxy's JSON-RPC error (HTTP 401).
    async def body(s):
        raise AssertionError("a session with a bad token")
    e = refused(with_session(stack, stack.camera, body, token=stack.office.token()))
    assert_refused(e)
    assert e.code == -32001, (e.code, e.message)  # the proxy's code for 401
    # On the wire: 401 and a JSON-RPC error object. Its id is the request's, or null: the proxy
    # checks the token before it reads the body, and JSON-RPC 2.0 answers null when the id
    # could not be determined (the SDK matches such an error to its pending request).
    init = {"jsonrpc": "2.0", "id": "init-1", "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}}
    with httpx.Client(verify=stack.camera.ctx, timeout=20) as c:
        r = c.post(stack.url, json=init, headers={"Authorization": "Bearer not-a-token",
                                                  "Accept": "application/json, text/event-stream"})
    assert r.status_code == 401, r.text
    err = r.json()
    assert err["jsonrpc"] == "2.0" and err["id"] in ("init-1", None), err
    assert "result" not in err, err
    assert -32099 <= err["error"]["code"] <= -32000, err
