"""A real MCP server built with the pinned `mcp` package (MCPServer, the FastMCP of mcp 1.x)
over streamable HTTP, for the proxy interop tests.

    python mcp_server.py --port 8931 --calls calls.jsonl [--json-response] [--stateless]

Tools: read_sensor(line), read_file(path) (returns made-up content, never touches the disk),
shutdown_line(line). Every tool call is appended to --calls as a JSON line before it answers, so
a test can prove a refused call never reached the server.
"""
import argparse
import json
import time

from mcp.server.mcpserver import MCPServer


def build(calls_path: str) -> MCPServer:
    app = MCPServer("sigil-interop-tools", log_level="WARNING")

    def log(tool: str, **arguments):
        with open(calls_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "tool": tool, "arguments": arguments}) + "\n")

    @app.tool()
    def read_sensor(line: int) -> str:
        """Reads the temperature and vibration sensors of a production line."""
        log("read_sensor", line=line)
        return f"line {line}: temperature 41.5 C, vibration 0.02 g"

    @app.tool()
    def read_file(path: str) -> str:
        """Returns the content of a file on the line controller (made up: no disk access)."""
        log("read_file", path=path)
        return f"fake content of {path}"

    @app.tool()
    def shutdown_line(line: int) -> str:
        """Stops a production line."""
        log("shutdown_line", line=line)
        return f"line {line} shut down"

    return app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--calls", required=True, help="file that records every tool call")
    p.add_argument("--json-response", action="store_true", help="answer in JSON instead of SSE")
    p.add_argument("--stateless", action="store_true", help="no MCP sessions")
    a = p.parse_args()
    build(a.calls).run("streamable-http", host="127.0.0.1", port=a.port, streamable_http_path="/mcp",
                       json_response=a.json_response, stateless_http=a.stateless)


if __name__ == "__main__":
    main()
