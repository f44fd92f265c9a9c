"""A small OpenAI-compatible model server that records what reaches it, for the outbound
sidecar tests: every request's method, path and headers are appended to --record as a JSON
line before it answers, so a test can prove what arrived (the caller's identity set by the
callee's sidecar) and what never did (the app's API key, a refused call).

    python openai_upstream.py --port 8000 --record requests.jsonl

Serves GET /v1/models and POST /v1/chat/completions (a JSON answer, or SSE chunks when the
body asks for "stream": true).
"""
import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    record = ""

    def log_message(self, *args):
        pass

    def note(self, body: bytes):
        with open(self.record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "headers": [[k, v] for k, v in self.headers.items()],
                                "body": body.decode("utf-8", "replace")}) + "\n")

    def reply(self, status: int, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.note(b"")
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "sigil-test"}
                for m in ("defect-detector", "secret-model")]})
        else:
            self.reply(404, {"error": {"message": "not found"}})

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        self.note(body)
        if self.path != "/v1/chat/completions":
            self.reply(404, {"error": {"message": "not found"}})
            return
        req = json.loads(body)
        model = req.get("model")
        words = ["part", "7", "has", "no", "defect"]
        if not req.get("stream"):
            self.reply(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for i, w in enumerate(words):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model,
                     "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w},
                                  "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", required=True)
    a = p.parse_args()
    Handler.record = a.record
    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
