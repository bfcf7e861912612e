"""The collector's write side, one stage per module, in the order a span goes through:

``otlp_grpc`` / ``otlp_http`` (receivers: the raw request in, a gRPC code or HTTP status
out; ``otlp_parse`` reads OTLP/protobuf and OTLP/JSON) → ``decode`` (validate and lay out
in columns; a packed decode span stays one row) → ``derive`` (request, KV-transfer and
clock rows) → ``pipeline`` (group commit into the durable log ``wal``, whose records
``logrecord`` lays out; the ClickHouse writer reads the log from its cursor) and
``forward`` (each OTLP target reads the log from its own cursor; ``expand`` turns a
packed decode span into the token spans it sends).
"""
