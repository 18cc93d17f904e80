"""A Lark grammar of one SQLite ``SELECT`` over a database's own tables and columns (schema-constrained decoding).

Decoded under it (``eval.response_format: grammar``, ``generate --grammar``, a server request's
``structured_outputs.grammar``), a model can only name tables and columns the database has and write SQL that
parses: ``FROM registrations`` on a database without that table cannot be produced, the model's next most likely
table is taken instead. This is the idea of PICARD (Scholak et al., 2021) with llguidance's grammar engine instead
of an incremental parser.

What the grammar covers: ``SELECT [DISTINCT]`` expressions with ``AS`` aliases, one table and ``[LEFT|INNER] JOIN
... ON``, ``WHERE``/``HAVING`` conditions (comparisons, ``AND``/``OR``/``NOT``, ``LIKE``, ``IN`` a list or a
subquery, ``BETWEEN``, ``IS [NOT] NULL``, ``EXISTS``), ``GROUP BY``, ``ORDER BY ... ASC|DESC``, ``LIMIT``/``OFFSET``,
arithmetic, ``CASE``, ``CAST``, aggregates and SQLite's common scalar functions, string and number literals.
Keywords in any case; one space, or a line break and indentation, between words. Not covered: ``WITH``, ``UNION``,
window functions. Tables and columns come from the file (opened read-only); aliases (``o``, ``AS revenue``) are
free names, and ``GROUP BY``/``ORDER BY`` may name an alias. A column qualified by an alias (``o.amount``) must be
a column of some table, not necessarily of the aliased one.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from skilltune.errors import DataError

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_RULES = r"""
start: query _S? ";"?
query: "SELECT"i _S ("DISTINCT"i _S)? items _S "FROM"i _S source join* where? group? having? order? limit?
items: item (_C item)*
item: "*" | NAME "." "*" | expr (_S "AS"i _S NAME)?
source: TABLE (_S NAME)? | "(" _S? query _S? ")" _S NAME
join: _S (("LEFT"i | "INNER"i) _S)? "JOIN"i _S TABLE (_S NAME)? _S "ON"i _S cond
where: _S "WHERE"i _S cond
group: _S "GROUP"i _S "BY"i _S key (_C key)*
having: _S "HAVING"i _S cond
order: _S "ORDER"i _S "BY"i _S sort (_C sort)*
sort: key (_S ("ASC"i | "DESC"i))?
key: expr | NAME
limit: _S "LIMIT"i _S INT (_S "OFFSET"i _S INT)?
cond: conj (_S "OR"i _S conj)*
conj: neg (_S "AND"i _S neg)*
neg: ("NOT"i _S)? pred
pred: expr _S? CMP _S? expr
    | expr _S ("NOT"i _S)? "LIKE"i _S expr
    | expr _S ("NOT"i _S)? "IN"i _S? "(" _S? (query | expr (_C expr)*) _S? ")"
    | expr _S ("NOT"i _S)? "BETWEEN"i _S expr _S "AND"i _S expr
    | expr _S "IS"i _S ("NOT"i _S)? "NULL"i
    | "EXISTS"i _S? "(" _S? query _S? ")"
    | "(" _S? cond _S? ")"
expr: term (_S? OP _S? term)*
term: column | STRING | NUMBER | "NULL"i | call | "(" _S? expr _S? ")" | "(" _S? query _S? ")"
    | "CASE"i (_S "WHEN"i _S cond _S "THEN"i _S expr)+ (_S "ELSE"i _S expr)? _S "END"i
    | "CAST"i "(" _S? expr _S "AS"i _S TYPE _S? ")"
call: "COUNT"i "(" _S? "*" _S? ")" | AGG "(" _S? ("DISTINCT"i _S)? expr _S? ")" | FUNC "(" _S? expr (_C expr)* _S? ")"
column: (NAME ".")? COLUMN
AGG: "COUNT"i | "SUM"i | "AVG"i | "MIN"i | "MAX"i | "TOTAL"i | "GROUP_CONCAT"i
FUNC: "strftime"i | "date"i | "datetime"i | "julianday"i | "substr"i | "length"i | "lower"i | "upper"i | "trim"i
    | "round"i | "abs"i | "coalesce"i | "ifnull"i | "nullif"i | "replace"i | "instr"i | "min"i | "max"i
TYPE: "INTEGER"i | "REAL"i | "TEXT"i | "NUMERIC"i
CMP: "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
OP: "+" | "-" | "*" | "/" | "%" | "||"
NAME: /[A-Za-z_][A-Za-z0-9_]{0,63}/
STRING: /'([^']|'')*'/
NUMBER: /-?[0-9]+(\.[0-9]+)?/
INT: /[0-9]+/
_C: "," _S?
_S: / |\n {0,8}/
"""


def _literal(name: str) -> str:
    """A table or column name as a Lark literal: plain names in any case, others as SQL quotes them."""
    if _PLAIN.fullmatch(name):
        return json.dumps(name) + "i"
    return json.dumps('"' + name.replace('"', '""') + '"')


def _shown(name: str) -> str:
    """A name for the grammar's comment line: plain names as they are, others JSON-quoted (no line break can end
    the comment and start grammar text)."""
    return name if _PLAIN.fullmatch(name) else json.dumps(name)


def schema_of(db: str | Path) -> dict[str, list[str]]:
    """Table (and view) -> its column names, read from ``db`` opened read-only."""
    path = Path(db)
    if not path.is_file():
        raise DataError(f"{db}: no such database file", hint="give the SQLite file the queries run against")
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                                "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            schema = {t: [r[1] for r in con.execute(f'PRAGMA table_info("{t.replace(chr(34), chr(34) * 2)}")')]
                      for t in tables}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise DataError(f"{db}: not a readable SQLite database ({exc})") from None
    if not schema:
        raise DataError(f"{db}: the database has no tables", hint="give the SQLite file the queries run against")
    return schema


def sqlite_grammar(db: str | Path) -> str:
    """The Lark grammar of one SELECT over ``db``'s tables and columns (module docstring)."""
    schema = schema_of(db)
    columns = sorted({c for cols in schema.values() for c in cols})
    tables = "; ".join(f"{_shown(table)}({', '.join(map(_shown, cols))})" for table, cols in schema.items())
    head = (f"// One SQLite SELECT over the tables and columns of {_shown(Path(db).name)} "
            f"(skilltune data sql-grammar).\n// Tables: {tables}\n")
    names = (f"TABLE: {' | '.join(_literal(t) for t in schema)}\n"
             f"COLUMN: {' | '.join(_literal(c) for c in columns)}\n")
    return head + _RULES.lstrip("\n") + names
