"""Names and DDL shared by the instrumentation and the collector — nothing else."""

from tokentrace.schemas import attributes, layout
from tokentrace.schemas.ddl import DATABASE, ddl_statements

__all__ = ["DATABASE", "attributes", "ddl_statements", "layout"]
