"""Names and DDL shared by the instrumentation and the collector — nothing else."""

from tokentrace.schemas import attributes
from tokentrace.schemas.ddl import DATABASE, QUERY_USER, ddl_statements, query_user_statements

__all__ = [
    "DATABASE",
    "QUERY_USER",
    "attributes",
    "ddl_statements",
    "query_user_statements",
]
