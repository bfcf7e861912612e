"""The collector's write side, one stage per module, in the order a span goes through:

``otlp_grpc`` / ``otlp_http`` (receivers: the raw request in, a gRPC code or HTTP status
out) → ``decode`` (parse and validate; a packed decode span stays one row) → ``derive``
(request, KV-transfer and clock rows) → ``pipeline`` (group commit into the durable log
``wal``, whose records ``logrecord`` lays out; the ClickHouse writer reads the log from
its cursor) and ``forward`` (each OTLP target reads the log from its own cursor).
"""
