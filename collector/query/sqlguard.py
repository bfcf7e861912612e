"""What the SQL query API lets through: one read of tokentrace's data, nothing else.

The decision is made on ClickHouse's own parse of the statement, never on our reading
of its text. The statement goes to the engine as data (a hex literal, so nothing in it
is SQL to the query that carries it): ``parseQueryToJSON`` returns the engine's parse
tree, in which escapes (`` `\\x66ile` ``), quoting, comments and letter case are already
resolved. That tree is judged against allowlists (:mod:`.sqlallow`), fail-closed:

- the statement is a ``SELECT`` (with ``WITH``, ``UNION``, ``INTERSECT``, ``EXCEPT``,
  subqueries), an ``EXPLAIN`` of one, ``SHOW TABLES [FROM tokentrace]`` or
  ``SHOW COLUMNS FROM <tokentrace table>``;
- every node type and every key of a node is one this module knows; anything a later
  ClickHouse adds to the tree is refused until it is added here;
- every table read is one of tokentrace's (qualified, or unqualified: the API's session
  uses the tokentrace database) or an allowed ``system`` table; every identifier that
  starts with another database's name is refused, wherever it stands (``x IN
  system.users``, ``system.one.dummy``);
- every function, aggregate (with combinators) and table function is on an allowlist;
- every setting in a ``SETTINGS`` clause is on an allowlist (none of them a limit);
- no ``INTO OUTFILE``, no ``FORMAT`` (the API picks the result format), and query
  parameters are values (``{name:Type}`` of a value type, never ``Identifier``).

What runs is not the text that came in: query parameters are put into the judged tree
as literals (``_CAST(value, 'Type')``, as ClickHouse's own binding does), the engine
formats that tree back into SQL (``formatQueryFromJSON``), and the formatted text runs
only if the engine parses it back into exactly the judged tree. So the statement that
runs is the one that was judged, whatever the client library does with parameters.

Nothing is read before the judgement: parsing and formatting read no table. The
statement then runs in the store's read-only session, under the limits of
:class:`QueryLimits`. A refused statement raises :class:`UnsafeQuery` naming what was
refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tokentrace.schemas import DATABASE

from ..store import QueryResult, Store, StoreError
from . import sqlallow

__all__ = [
    "MAX_STATEMENT_BYTES",
    "CheckedStatement",
    "QueryLimits",
    "UnsafeQuery",
    "check_statement",
    "function_allowed",
    "guarded_query",
    "judge",
]

#: Longest statement the API takes (bytes of UTF-8); its hex form must fit the engine's
#: default ``max_query_size`` (256 KiB) with room to spare.
MAX_STATEMENT_BYTES = 65_536


class UnsafeQuery(ValueError):
    """The statement is refused before it runs; the message says why."""


@dataclass(frozen=True)
class QueryLimits:
    """What every read through the store's query session runs under (ClickHouse
    settings of that session; a statement cannot set them itself)."""

    max_execution_time_s: float = 30.0
    max_result_rows: int = 100_000
    max_result_bytes: int = 256 << 20
    max_memory_bytes: int = 1 << 30

    def validate(self) -> None:
        for name in ("max_execution_time_s", "max_result_rows", "max_result_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_memory_bytes < 16 << 20:
            raise ValueError(f"max_memory_bytes must be >= 16 MiB, got {self.max_memory_bytes!r}")

    def settings(self) -> dict[str, Any]:
        return {
            "max_execution_time": self.max_execution_time_s,
            "timeout_overflow_mode": "throw",
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_bytes,
        }


@dataclass(frozen=True)
class CheckedStatement:
    """A judged statement: ``sql`` is the engine's own formatting of the judged tree
    with the parameters in it as literals -- the text to run, with no parameters."""

    sql: str
    tree: dict[str, Any]


# -- what the tree may hold -----------------------------------------------------------

_OUTPUT_FLAGS = ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout")

#: node type → the keys it may have. A key outside its type's set is refused.
_KEYS: dict[str, frozenset[str]] = {
    name: frozenset(keys.split())
    for name, keys in {
        "SelectWithUnionQuery": "union_mode list_of_modes list_of_selects settings_ast alias "
        + " ".join(_OUTPUT_FLAGS),
        "SelectQuery": "with recursive_with select distinct tables prewhere where group_by "
        "group_by_all group_by_with_totals group_by_with_rollup group_by_with_cube "
        "group_by_with_grouping_sets having window qualify order_by order_by_all interpolate "
        "limit_by limit_by_length limit_by_offset limit_by_all limit_offset limit_length "
        "limit_with_ties settings",
        "ExplainQuery": "kind query settings " + " ".join(_OUTPUT_FLAGS),
        "ShowTablesQuery": "from like not_like case_insensitive_like limit_length full "
        + " ".join(_OUTPUT_FLAGS),
        "ShowColumnsQuery": "database table like not_like case_insensitive_like limit_length "
        "full extended " + " ".join(_OUTPUT_FLAGS),
        "ExpressionList": "children",
        "Subquery": "children alias cte_name",
        "WithElement": "name subquery",
        "TablesInSelectQuery": "children",
        "TablesInSelectQueryElement": "table_expression table_join array_join",
        "TableExpression": "database_and_table_name table_function subquery final "
        "sample_size sample_offset",
        "TableIdentifier": "name name_parts alias children",
        "TableJoin": "kind strictness locality using_expression_list on_expression",
        "ArrayJoin": "kind expression_list",
        "SampleRatio": "numerator denominator",
        "Function": "name arguments parameters alias is_operator is_lambda_function "
        "is_window_function window_name window_definition nulls_action kind",
        "Identifier": "name name_parts alias children",
        "Literal": "value alias",
        "QueryParameter": "name param_type alias",
        "Asterisk": "transformers",
        "QualifiedAsterisk": "qualifier transformers",
        "ColumnsRegexpMatcher": "pattern transformers",
        "ColumnsListMatcher": "column_list transformers",
        "QualifiedColumnsRegexpMatcher": "pattern qualifier transformers",
        "QualifiedColumnsListMatcher": "column_list qualifier transformers",
        "ColumnsTransformerList": "children",
        "ColumnsExceptTransformer": "children is_strict pattern",
        "ColumnsReplaceTransformer": "children is_strict",
        "ColumnsReplaceTransformerReplacement": "name children",
        "OrderByElement": "expression direction nulls_direction "
        "nulls_direction_was_explicitly_specified collation with_fill fill_from fill_to "
        "fill_step fill_staleness",
        "InterpolateElement": "column expr",
        "WindowDefinition": "parent_window_name partition_by order_by frame_type "
        "frame_is_default frame_begin_type frame_begin_offset frame_begin_preceding "
        "frame_end_type frame_end_offset frame_end_preceding",
        "WindowListElement": "name definition",
        "SetQuery": "changes",
    }.items()
}
_STATEMENTS = frozenset(
    {"SelectWithUnionQuery", "ExplainQuery", "ShowTablesQuery", "ShowColumnsQuery"}
)
_FUNCTION_KINDS = frozenset({"ORDINARY_FUNCTION", "WINDOW_FUNCTION", "LAMBDA_FUNCTION"})
# What a refused key or statement is called in SQL, for the message.
_KEY_WORDS = {
    "out_file": "INTO OUTFILE (the API returns the result; it writes no file)",
    "format_ast": "FORMAT (the API picks the result format)",
    "compression": "COMPRESSION",
}
_STATEMENT_WORDS = {
    "InsertQuery": "INSERT",
    "CreateQuery": "CREATE",
    "AlterQuery": "ALTER",
    "DropQuery": "DROP",
    "RenameQuery": "RENAME",
    "DeleteQuery": "DELETE",
    "UpdateQuery": "UPDATE",
    "SetQuery": "SET",
    "UseQuery": "USE",
    "SystemQuery": "SYSTEM",
    "KillQueryQuery": "KILL",
    "OptimizeQuery": "OPTIMIZE",
    "TransactionControl": "transaction control",
}
_CI_LOWER = frozenset(name.lower() for name in sqlallow.CASE_INSENSITIVE)
_CI_AGGREGATES_LOWER = frozenset(
    name.lower() for name in sqlallow.CASE_INSENSITIVE & sqlallow.AGGREGATE_FUNCTIONS
)
_TYPE_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z_][A-Za-z0-9_]*)|\d+|'(?:[^'\\]|\\.)*'|[(),])")
_IN_SCOPE = re.compile(r"[:.]?\s*In scope SELECT .*", re.DOTALL)
_CODE = re.compile(r"^(query failed: )?Code: \d+\. DB::Exception: ")


def function_allowed(name: str) -> bool:
    """Whether an ordinary, aggregate or window function of this name (as the parser
    gives it: any letter case, aggregate combinators such as ``quantileExactIf``)
    resolves to one on the allowlist."""
    if name in sqlallow.FUNCTIONS or name.lower() in _CI_LOWER:
        return True
    return _aggregate_allowed(name, depth=0)


def _aggregate_allowed(name: str, depth: int) -> bool:
    if name in sqlallow.AGGREGATE_FUNCTIONS or name.lower() in _CI_AGGREGATES_LOWER:
        return True
    if depth >= 4:
        return False
    return any(
        name.endswith(suffix)
        and len(name) > len(suffix)
        and _aggregate_allowed(name[: -len(suffix)], depth + 1)
        for suffix in sqlallow.COMBINATORS
    )


def _parameter_type_allowed(type_name: str) -> bool:
    pos = 0
    text = type_name.strip()
    while pos < len(text):
        m = _TYPE_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return False
        word = m.group("word")
        if word is not None and word not in sqlallow.PARAMETER_TYPES:
            return False
        pos = m.end()
    return bool(text)


def _parts(node: Mapping[str, Any]) -> list[str]:
    """An identifier's parts; a dotted name without parts is taken as dotted, so a
    tree that ever spells ``db.table`` that way is still checked as one."""
    parts = node.get("name_parts")
    if isinstance(parts, list) and parts and all(isinstance(p, str) for p in parts):
        return list(parts)
    name = node.get("name")
    return name.split(".") if isinstance(name, str) else []


def _table_allowed(database: str, table: str) -> bool:
    return database == DATABASE or (database == "system" and table in sqlallow.SYSTEM_TABLES)


def _refuse_table(database: str, table: str) -> UnsafeQuery:
    return UnsafeQuery(
        f"{database}.{table} is outside tokentrace's tables; the query API reads "
        f"{DATABASE}.* and system.{{{', '.join(sorted(sqlallow.SYSTEM_TABLES))}}}"
    )


def _children(node: Any) -> Iterator[dict[str, Any]]:
    """Every node (a dict with a ``type``) anywhere inside ``node``'s value, outermost
    first: field values and lists are searched too, so nothing nested goes unjudged."""
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "type" in value:
                yield value
                continue
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))


def judge(tree: Mapping[str, Any], databases: frozenset[str] = frozenset()) -> set[str]:
    """Raise :class:`UnsafeQuery` unless ``tree`` (``parseQueryToJSON``'s output) is one
    read of tokentrace's data (see the module's docstring); ``databases`` are the names
    of the engine's databases. Returns the names of the query parameters it uses.
    Pure: reads nothing."""
    root_type = tree.get("type")
    if root_type not in _STATEMENTS:
        word = _STATEMENT_WORDS.get(str(root_type), str(root_type))
        raise UnsafeQuery(
            "only reads are allowed (SELECT or WITH, EXPLAIN of one, SHOW TABLES, "
            f"SHOW COLUMNS), not {word}"
        )
    other_databases = databases - {DATABASE}
    parameters: set[str] = set()
    # (node, what its place in the tree makes it)
    stack: list[tuple[Mapping[str, Any], str]] = [(tree, "statement")]
    while stack:
        node, place = stack.pop()
        kind = node.get("type")
        if not isinstance(kind, str) or kind not in _KEYS:
            raise UnsafeQuery(f"{kind} is not allowed in a statement of the query API")
        if kind in _STATEMENTS - {"SelectWithUnionQuery"} and place != "statement":
            raise UnsafeQuery(f"{kind} is only allowed as the whole statement")
        for key in node:
            if key != "type" and key not in _KEYS[kind]:
                if kind == "ShowTablesQuery":
                    raise UnsafeQuery(
                        f"SHOW {key.upper()} is not allowed: only SHOW TABLES [FROM "
                        f"{DATABASE}] and SHOW COLUMNS FROM <table>"
                    )
                what = _KEY_WORDS.get(key, f"{key!r} in {kind}")
                raise UnsafeQuery(f"{what} is not allowed")
        for flag in _OUTPUT_FLAGS:
            if node.get(flag):
                raise UnsafeQuery(f"{_KEY_WORDS['out_file']} is not allowed")
        places: dict[int, str] = {}  # id(child node) → its place, where not "expression"
        if kind == "Function":
            _judge_function(node, place)
        elif kind in ("Identifier", "TableIdentifier"):
            if "children" in node:
                raise UnsafeQuery(
                    "a table or column cannot be named by a query parameter "
                    "({name:Identifier}); parameters are values"
                )
            parts = _parts(node)
            if kind == "TableIdentifier":
                if not parts or len(parts) > 2:
                    raise UnsafeQuery("a table must be named as table or database.table")
                if len(parts) == 2 and not _table_allowed(parts[0], parts[1]):
                    raise _refuse_table(parts[0], parts[1])
            elif place == "database":
                if parts != [DATABASE]:
                    raise UnsafeQuery(f"SHOW TABLES lists {DATABASE}'s tables only")
            elif len(parts) >= 2 and parts[0] in other_databases:
                if not _table_allowed(parts[0], parts[1]):
                    raise _refuse_table(parts[0], parts[1])
        elif kind == "QueryParameter":
            name, type_name = node.get("name"), node.get("param_type")
            if not isinstance(name, str) or not isinstance(type_name, str):
                raise UnsafeQuery("a query parameter needs a name and a type")
            if not _parameter_type_allowed(type_name):
                raise UnsafeQuery(
                    f"query parameter {{{name}:{type_name}}}: parameters are values "
                    f"(String, numbers, dates and times, UUID, IPv4/6, Bool and arrays, "
                    f"tuples, maps or nullables of them), not {type_name}"
                )
            parameters.add(name)
        elif kind == "SetQuery":
            allowed = sqlallow.EXPLAIN_OPTIONS if place == "explain" else sqlallow.SETTINGS
            for change in node.get("changes") or ():
                name = change.get("name") if isinstance(change, dict) else None
                if name not in allowed:
                    raise UnsafeQuery(
                        f"EXPLAIN option {name} is not allowed"
                        if place == "explain"
                        else f"the setting {name} cannot be set through the query API "
                        f"(allowed: {', '.join(sorted(allowed))})"
                    )
        elif kind == "ExplainQuery":
            if node.get("kind") not in sqlallow.EXPLAIN_KINDS:
                raise UnsafeQuery(f"{node.get('kind')} is not allowed")
            query = node.get("query")
            if not isinstance(query, dict) or query.get("type") != "SelectWithUnionQuery":
                raise UnsafeQuery("EXPLAIN is allowed of a SELECT only")
            settings = node.get("settings")
            if isinstance(settings, dict):
                places[id(settings)] = "explain"
            places[id(query)] = "explained"
        elif kind == "ShowTablesQuery":
            source = node.get("from")
            if isinstance(source, dict):
                places[id(source)] = "database"
        elif kind == "ShowColumnsQuery":
            if node.get("database") not in (None, DATABASE):
                raise _refuse_table(str(node.get("database")), str(node.get("table")))
        elif kind == "TableExpression":
            function = node.get("table_function")
            if isinstance(function, dict):
                places[id(function)] = "table function"
        for key, value in node.items():
            if key == "type":
                continue
            for child in _children(value):
                child_place = places.get(id(child), "expression")
                if child_place == "explained":
                    child_place = "statement"
                stack.append((child, child_place))
    return parameters


def _judge_function(node: Mapping[str, Any], place: str) -> None:
    name = node.get("name")
    if not isinstance(name, str):
        raise UnsafeQuery("a function call needs a name")
    if node.get("kind") not in (None, *_FUNCTION_KINDS):
        raise UnsafeQuery(f"{node.get('kind')} {name} is not allowed")
    if place == "table function":
        if name not in sqlallow.TABLE_FUNCTIONS:
            raise UnsafeQuery(
                f"the table function {name}() is not allowed; the query API reads "
                f"tokentrace's tables and these: {', '.join(sorted(sqlallow.TABLE_FUNCTIONS))}"
            )
        return
    if not function_allowed(name):
        raise UnsafeQuery(
            f"the function {name}() is not allowed: the query API runs functions that "
            "compute on the rows it reads, none that reach files, URLs, other servers, "
            "programs or the server's own state"
        )


# -- parameters as literals ------------------------------------------------------------


def _field(value: Any, name: str) -> dict[str, Any]:
    """``value`` (from JSON) as a ClickHouse field of the engine's JSON parse tree."""
    if value is None:
        return {"field_type": "Null", "value": None}
    if isinstance(value, bool):
        return {"field_type": "Bool", "value": value}
    if isinstance(value, int):
        if -(1 << 63) <= value < 0:
            return {"field_type": "Int64", "value": value}
        if 0 <= value < (1 << 64):
            return {"field_type": "UInt64", "value": value}
        raise UnsafeQuery(f"parameter {name}: {value} does not fit 64 bits; pass it as a string")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise UnsafeQuery(f"parameter {name}: pass non-finite numbers as strings")
        return {"field_type": "Float64", "value": value}
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeQuery(f"parameter {name} is not valid UTF-8") from None
        return {"field_type": "String", "value": value}
    if isinstance(value, list):
        return {"field_type": "Array", "value": [_field(v, name) for v in value]}
    raise UnsafeQuery(
        f"parameter {name}: values are strings, numbers, booleans, null or arrays of them"
    )


def _bind(tree: Any, params: Mapping[str, Any]) -> Any:
    """``tree`` with every ``{name:Type}`` replaced by ``_CAST(value, 'Type')``."""
    if isinstance(tree, list):
        return [_bind(v, params) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if tree.get("type") == "QueryParameter":
        name = tree["name"]
        if name not in params:
            raise UnsafeQuery(f"the statement uses the parameter {{{name}:...}}; give its value")
        cast: dict[str, Any] = {
            "type": "Function",
            "name": "_CAST",
            "arguments": {
                "type": "ExpressionList",
                "children": [
                    {"type": "Literal", "value": _field(params[name], name)},
                    {"type": "Literal", "value": _field(tree["param_type"], name)},
                ],
            },
        }
        if "alias" in tree:
            cast["alias"] = tree["alias"]
        return cast
    return {k: _bind(v, params) for k, v in tree.items()}


# -- through the engine ----------------------------------------------------------------


def _hex(text: str) -> str:
    return text.encode("utf-8").hex()


def _engine(store: Store, sql: str) -> tuple[Any, ...]:
    """One row of a query about the statement (never reading a table), or UnsafeQuery
    with the engine's reason when it cannot parse or format it."""
    try:
        return store.query(sql, readonly=True).rows[0]
    except StoreError as exc:
        if exc.transient:
            raise
        reason = _CODE.sub("", _IN_SCOPE.sub("", str(exc))).strip()
        if "JSON serialization" in reason or "not supported by parseQueryToJSON" in reason:
            node = re.search(r"AST node of type '([^']+)'", reason)
            what = f"a {node.group(1)} statement" if node else "this statement"
            raise UnsafeQuery(
                f"ClickHouse cannot give the parse tree of {what}, so the query API "
                "cannot check it; it runs reads: SELECT, EXPLAIN, SHOW TABLES, SHOW COLUMNS "
                "(instead of DESCRIBE: SHOW COLUMNS FROM <table>)"
            ) from exc
        raise UnsafeQuery(f"ClickHouse does not parse it: {reason}") from exc


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise UnsafeQuery("the statement is nested too deeply") from None


def check_statement(
    store: Store, sql: str, params: Mapping[str, Any] | None = None
) -> CheckedStatement:
    """Judge ``sql`` on the engine's parse (see the module's docstring) and return the
    text to run. Raises :class:`UnsafeQuery` (refused, nothing run) or ``StoreError``
    (the engine could not be asked). Blocks for two round trips to the engine."""
    try:
        size = len(sql.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeQuery("the statement is not valid UTF-8") from None
    if not sql.strip():
        raise UnsafeQuery("the query is empty")
    if size > MAX_STATEMENT_BYTES:
        raise UnsafeQuery(f"the statement is {size} bytes; the limit is {MAX_STATEMENT_BYTES}")
    tree_json, databases = _engine(
        store,
        f"SELECT parseQueryToJSON(unhex('{_hex(sql)}')), "
        "(SELECT groupArray(name) FROM system.databases)",
    )
    tree = _loads(tree_json)
    if not isinstance(tree, dict):
        raise UnsafeQuery("ClickHouse returned no parse tree for it")
    used = judge(tree, frozenset(databases))
    bound = _bind(tree, {k: v for k, v in (params or {}).items() if k in used})
    bound_json = json.dumps(bound, ensure_ascii=False)
    text, again = _engine(
        store,
        f"SELECT formatQueryFromJSON(unhex('{_hex(bound_json)}')) AS text, parseQueryToJSON(text)",
    )
    if _loads(again) != bound:
        raise UnsafeQuery(
            "ClickHouse formats this statement into one that parses differently; "
            "write it another way"
        )
    return CheckedStatement(sql=text, tree=bound)


def guarded_query(store: Store, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult:
    """Run a user's statement: judged (:func:`check_statement`), then run as the engine
    formatted it in the store's read-only session, under its :class:`QueryLimits`.
    Raises :class:`UnsafeQuery` (refused before running) or ``StoreError``."""
    checked = check_statement(store, sql, params)
    return store.query(checked.sql, readonly=True)
