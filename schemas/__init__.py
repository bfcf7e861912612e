"""Names and DDL shared by the instrumentation and the collector — nothing else."""

from tokentrace.schemas import attributes
from tokentrace.schemas.ddl import (
    DATABASE,
    QUERY_USER,
    SPAN_COLUMNS,
    TOKEN_EMISSIONS_COLUMNS,
    TOKEN_SPANS_COLUMNS,
    ddl_statements,
    query_user_statements,
    upgrade_statements,
)

__all__ = [
    "DATABASE",
    "QUERY_USER",
    "SPAN_COLUMNS",
    "TOKEN_EMISSIONS_COLUMNS",
    "TOKEN_SPANS_COLUMNS",
    "attributes",
    "ddl_statements",
    "query_user_statements",
    "upgrade_statements",
]
