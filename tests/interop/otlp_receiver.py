"""A real OpenTelemetry receiver for the interop tests: OTLP/HTTP with protobuf bodies (gzip
or not) and OTLP/gRPC (grpcio), each request parsed with the official `opentelemetry-proto`
messages. What did not parse is kept in `errors`."""
import gzip
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest, ExportLogsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

SIGNALS = {
    "traces": ("/v1/traces", "opentelemetry.proto.collector.trace.v1.TraceService",
               ExportTraceServiceRequest, ExportTraceServiceResponse),
    "logs": ("/v1/logs", "opentelemetry.proto.collector.logs.v1.LogsService",
             ExportLogsServiceRequest, ExportLogsServiceResponse),
}


class OtlpReceiver:
    """Receives one signal (`traces` or `logs`) over `protocol` (`http/protobuf` or `grpc`).
    `requests` holds (path or method, lower-cased headers or metadata, parsed message)."""

    def __init__(self, signal: str, protocol: str):
        self.path, service, self.request_cls, self.response_cls = SIGNALS[signal]
        self.protocol = protocol
        self.requests = []
        self.errors = []
        if protocol == "grpc":
            self._start_grpc(service)
        else:
            self._start_http()

    def _start_http(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    if headers.get("content-encoding") == "gzip":
                        body = gzip.decompress(body)
                    msg = receiver.request_cls.FromString(body)
                    receiver.requests.append((self.path, headers, msg))
                    status, out = 200, receiver.response_cls().SerializeToString()
                except Exception as e:  # noqa: BLE001 - any parse failure is a test failure
                    receiver.errors.append(f"{e}: {body[:200]!r}")
                    status, out = 400, b""
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _start_grpc(self, service):
        def export(request, context):
            md = {k.lower(): v for k, v in context.invocation_metadata()}
            self.requests.append((f"/{service}/Export", md, request))
            return self.response_cls()

        handler = grpc.method_handlers_generic_handler(service, {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=self.request_cls.FromString,
                response_serializer=self.response_cls.SerializeToString),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        if self.protocol == "grpc":
            self.server.stop(0)
        else:
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
