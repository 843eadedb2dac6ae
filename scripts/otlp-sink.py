"""A local OTLP/gRPC sink for benchmarks: accepts every export (traces,
metrics, logs) and answers with an empty response, counting requests and
bytes. Needs grpcio (Debian's python3-grpcio: /usr/bin/python3).

    /usr/bin/python3 scripts/otlp-sink.py PORT      # until killed
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT verdict serve
"""
import signal
import sys
import threading
from concurrent import futures

import grpc

counts = {"requests": 0, "bytes": 0}
lock = threading.Lock()


def export(request, context):
    with lock:
        counts["requests"] += 1
        counts["bytes"] += len(request)
    # Every Export*ServiceResponse has only optional fields: empty is valid.
    return b""


class Sink(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        return grpc.unary_unary_rpc_method_handler(export)


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Sink(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()

    def stop(*_):
        print(f"otlp-sink: {counts['requests']} exports, {counts['bytes']} bytes", flush=True)
        server.stop(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
