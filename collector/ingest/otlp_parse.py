"""OTLP/protobuf (:func:`parse_protobuf`) and OTLP/JSON (:func:`parse_json`) bytes → an
``ExportTraceServiceRequest``, or a :class:`DecodeError` that names what is wrong."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

__all__ = ["DecodeError", "parse_json", "parse_protobuf"]


class DecodeError(ValueError):
    """The request as a whole cannot be parsed (permanent: never retry it)."""


# What the protobuf runtime's (upb's) terse parse errors mean, for the sender.
_PARSE_HINTS = (
    (
        "bad UTF-8",
        "a string field (a name, key or string value) holds bytes that are not UTF-8; "
        "OTLP strings must be UTF-8 (send arbitrary bytes as bytes_value)",
    ),
    (
        "MaxDepth",
        "messages nested more than 100 levels deep, such as key-value lists inside "
        "key-value lists more than 32 levels deep in an attribute value",
    ),
)


def parse_protobuf(data: bytes | bytearray) -> ExportTraceServiceRequest:
    """Parse OTLP/protobuf bytes; :class:`DecodeError` names what is wrong.

    The whole request is refused when it is not a valid ``ExportTraceServiceRequest``:
    truncated or garbage bytes, a string that is not UTF-8 (proto3 requires it), or
    messages nested deeper than the protobuf runtime allows (100 levels).
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(data)
    except (_ProtobufDecodeError, ValueError) as exc:
        detail = str(exc)
        hints = [hint for marker, hint in _PARSE_HINTS if marker in detail]
        raise DecodeError(
            f"invalid OTLP protobuf ExportTraceServiceRequest ({len(data)} bytes): {detail}"
            + "".join(f" ({hint})" for hint in hints)
        ) from exc
    return request


def parse_json(data: bytes | bytearray | str) -> ExportTraceServiceRequest:
    """Parse OTLP/JSON; :class:`DecodeError` names what is wrong.

    Per the OTLP spec, trace and span ids are hex strings (not base64 as in proto3
    JSON), enums may be names or integers, int64 may be strings, and unknown fields are
    ignored.
    """
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from exc
    except RecursionError:
        # The parser recurses per level of arrays and objects; past Python's recursion
        # limit (~1,000 levels) it gives up. Nothing of OTLP nests that deep.
        raise DecodeError("invalid OTLP/JSON: arrays or objects nested too deeply") from None
    if not isinstance(doc, dict):
        raise DecodeError(
            f"invalid OTLP/JSON: expected an object at the top level, got {type(doc).__name__}"
        )
    _hex_ids_to_base64(doc)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise DecodeError(f"invalid OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
    return request


def _hex_ids_to_base64(doc: dict[str, Any]) -> None:
    """Rewrite OTLP/JSON hex ids in place to the base64 proto3 JSON expects."""
    resource_spans = _json_list(doc, "resourceSpans", "resource_spans", "")
    for r, rs in enumerate(resource_spans):
        scope_spans = _json_list(rs, "scopeSpans", "scope_spans", f"resourceSpans[{r}]")
        for s, ss in enumerate(scope_spans):
            spans = _json_list(ss, "spans", "spans", f"resourceSpans[{r}].scopeSpans[{s}]")
            for i, span in enumerate(spans):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                _rewrite_ids(
                    span,
                    where,
                    ("traceId", "trace_id"),
                    ("spanId", "span_id"),
                    ("parentSpanId", "parent_span_id"),
                )
                for k, link in enumerate(_json_list(span, "links", "links", where)):
                    _rewrite_ids(
                        link, f"{where}.links[{k}]", ("traceId", "trace_id"), ("spanId", "span_id")
                    )


def _json_list(obj: Any, camel: str, snake: str, where: str) -> list[Any]:
    if not isinstance(obj, dict):
        raise DecodeError(f"invalid OTLP/JSON: {where or 'request'} must be an object")
    value = obj.get(camel, obj.get(snake))
    if value is None:
        return []
    if not isinstance(value, list):
        prefix = f"{where}." if where else ""
        raise DecodeError(f"invalid OTLP/JSON: {prefix}{camel} must be a list")
    return value


def _rewrite_ids(obj: Any, where: str, *keys: tuple[str, str]) -> None:
    if not isinstance(obj, dict):
        raise DecodeError(f"invalid OTLP/JSON: {where} must be an object")
    for camel, snake in keys:
        for key in (camel, snake):
            value = obj.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DecodeError(f"invalid OTLP/JSON: {where}.{camel} must be a hex string")
            try:
                raw = bytes.fromhex(value)
            except ValueError as exc:
                raise DecodeError(
                    f"invalid OTLP/JSON: {where}.{camel} is not a hex string: {value!r}"
                ) from exc
            obj[key] = base64.b64encode(raw).decode("ascii")
