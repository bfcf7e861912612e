"""A span's node has one definition: node_of over a resource's attributes (the rows
the collector derives) and node_sql over the stored map (the waterfall's query) pick
the same attribute in every case."""

from __future__ import annotations

import chdb
import pytest

from tokentrace.schemas import attributes as A

CASES = [
    ({A.NODE_ID: "decode-1", A.HOST_NAME: "gpu-7", A.SERVICE_NAME: "svc"}, "decode-1"),
    ({A.HOST_NAME: "gpu-7", A.SERVICE_NAME: "svc"}, "gpu-7"),
    ({A.NODE_ID: "", A.HOST_NAME: "gpu-7", A.SERVICE_NAME: "svc"}, "gpu-7"),
    ({A.SERVICE_NAME: "svc"}, "svc"),
    ({"other": "x"}, ""),
]


@pytest.mark.parametrize(("attributes", "node"), CASES)
def test_python_and_sql_name_the_same_node(attributes: dict[str, str], node: str) -> None:
    assert A.node_of(attributes) == node
    literal = "map(" + ", ".join(f"'{k}', '{v}'" for k, v in attributes.items()) + ")"
    sql = f"SELECT {A.node_sql('m')} FROM (SELECT CAST({literal}, 'Map(String, String)') AS m)"
    assert chdb.query(sql, "TabSeparated").data().rstrip("\n") == node
