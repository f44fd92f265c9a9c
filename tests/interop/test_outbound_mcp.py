"""Agent-to-agent: agent A, the pinned `mcp` client with a plain `http://` URL and no
credentials, calls agent B's MCP tools (tests/interop/mcp_server.py) through A's outbound
sidecar and B's inbound sidecar. B's policy decides per tool on A's identity; A's egress
policy refuses what A may not do before anything leaves for B (B's audit log and the tool
server's call log show nothing arrived).
"""
import asyncio

import httpx2
import pytest
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

from conftest import TD, Agent, Proxy, Sigil, Workload, mcp_server, register
from test_outbound import PROXY, Outbound
from test_proxy_mcp import leaves

AGENT_A = f"spiffe://{TD}/floor/agent-a"
TIMEOUT = 60

# B: A's group may hold MCP sessions and list tools; every tool but shutdown_line.
POLICY_B = """
@id("b-session")
permit (principal in Group::"factory-floor", action == Action::"mcp", resource);
@id("b-stream")
permit (principal in Group::"factory-floor", action == Action::"http", resource)
when { resource == Endpoint::"GET /mcp" || resource == Endpoint::"DELETE /mcp" };
@id("b-list")
permit (principal in Group::"factory-floor", action == Action::"list_tools", resource);
@id("b-tools")
permit (principal in Group::"factory-floor", action == Action::"call_tool", resource)
unless { resource == Tool::"shutdown_line" };
"""

# A (egress): the tools-b route only; sensors and line control, never read_file.
POLICY_A = """
@id("a-route")
permit (principal, action == Action::"egress", resource == Route::"tools-b");
@id("a-session")
permit (principal, action == Action::"mcp", resource);
@id("a-stream")
permit (principal, action == Action::"http", resource)
when { resource == Endpoint::"GET /mcp" || resource == Endpoint::"DELETE /mcp" };
@id("a-list")
permit (principal, action == Action::"list_tools", resource);
@id("a-tools")
permit (principal, action == Action::"call_tool", resource)
when { resource == Tool::"read_sensor" || resource == Tool::"shutdown_line" };
"""


class Stack:
    def __init__(self, root):
        self.server = Sigil(root)
        self.parts = []
        try:
            self.agent = Agent(self.server, root)
            self.parts.append(self.agent)
            register(self.server, self.agent, "proxy", dns=["localhost"], enforcer=True)
            register(self.server, self.agent, "floor/agent-a", groups=["factory-floor"],
                     scopes=["model:invoke"], enforcer=True)
            self.calls = root / "tool-calls.jsonl"
            self.mcp = mcp_server(root, self.calls, json_response=False)
            self.parts.append(self.mcp)
            self.inbound = Proxy(self.server, self.agent, root, self.mcp.url, POLICY_B,
                                 mcp_path="/mcp")
            self.parts.append(self.inbound)
            route = (f'[[outbound.routes]]\nname = "{{name}}"\n'
                     f'address = "127.0.0.1:{self.inbound.port}"\nspiffe_id = "{PROXY}"\n'
                     'audience = "model-gw"\n')
            routes = (route.format(name="tools-b") + "default = true\n"
                      + route.format(name="tools-c") + 'hosts = ["tools-c"]\n')
            self.outbound = Outbound(self.server, self.agent, root, AGENT_A, POLICY_A, routes)
            self.parts.append(self.outbound)
            self.inbound.wait_ready(Workload(self.server, self.agent, root, AGENT_A).ctx)
            self.outbound.wait_listening()
        except BaseException:
            self.stop()
            raise

    def tool_calls(self) -> list:
        import json
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines() if line]

    def stop(self):
        for p in reversed(self.parts):
            p.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("outbound-mcp"))
    yield s
    s.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def session(stack, body, headers=None):
    # No certificate, no token: what an unmodified agent has.
    async with httpx2.AsyncClient(timeout=20, headers=headers or {}) as http:
        async with streamable_http_client(f"{stack.outbound.url}/mcp",
                                          http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=20) as s:
                await s.initialize()
                return await body(s)


def refused(coro) -> MCPError:
    try:
        run(coro)
    except BaseException as e:  # noqa: BLE001 - unwrapped below
        errors = [x for x in leaves(e) if isinstance(x, MCPError)]
        assert errors, repr(e)
        return errors[0]
    raise AssertionError("the call was not refused")


def test_a_calls_b_tools_and_b_decides_per_tool_on_a_identity(stack):
    async def body(s):
        tools = sorted(t.name for t in (await s.list_tools()).tools)
        out = await s.call_tool("read_sensor", {"line": 4})
        return tools, out
    tools, out = run(session(stack, body))
    # What A sees is what both sides permit: A's egress policy (read_sensor, shutdown_line)
    # and B's policy (everything but shutdown_line).
    assert tools == ["read_sensor"]
    assert out.content[0].text == "line 4: temperature 41.5 C, vibration 0.02 g"
    assert [c["tool"] for c in stack.tool_calls()][-1] == "read_sensor"
    b = [x for x in stack.inbound.audit() if x["spiffe_id"] == AGENT_A]
    assert any(c["action"] == "call_tool" and c["resource_id"] == "read_sensor"
               for x in b for c in x["calls"])

    # A's egress permits shutdown_line; B refuses it, on A's identity.
    calls = len(stack.tool_calls())
    err = refused(session(stack, lambda s: s.call_tool("shutdown_line", {"line": 4})))
    assert 'call_tool on Tool::"shutdown_line"' in str(err.error.message)
    denied = [x for x in stack.inbound.audit() if x["decision"] == "deny"][-1]
    assert denied["spiffe_id"] == AGENT_A
    assert [c["resource_id"] for c in denied["calls"]] == ["shutdown_line"]
    assert len(stack.tool_calls()) == calls


def test_a_egress_policy_refuses_before_b_sees_anything(stack):
    calls, b_records = len(stack.tool_calls()), len(stack.inbound.audit())
    # A tool A may not call: refused by A's sidecar.
    err = refused(session(stack, lambda s: s.call_tool("read_file", {"path": "/data/x"})))
    assert 'call_tool on Tool::"read_file"' in str(err.error.message)
    a_denied = [x for x in stack.outbound.audit() if x["decision"] == "deny"][-1]
    assert a_denied["route"] == "tools-b"
    assert [c["resource_id"] for c in a_denied["calls"]] == ["tools-b", "read_file"]
    # B recorded the session's initialize but no read_file call; the tool never ran.
    after = stack.inbound.audit()[b_records:]
    assert not any(c["resource_id"] == "read_file" for x in after for c in x["calls"])
    assert len(stack.tool_calls()) == calls

    # A route A may not use at all: refused at initialize, nothing reaches B.
    b_records = len(stack.inbound.audit())
    err = refused(session(stack, lambda s: s.list_tools(), headers={"host": "tools-c"}))
    assert 'egress on Route::"tools-c"' in str(err.error.message)
    assert len(stack.inbound.audit()) == b_records
