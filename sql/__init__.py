"""The SQL of toa, all of it: DuckDB view definitions over the Parquet shards, one file per
concern (*.sql), and every query the code runs (queries/*.sql), one file per query.

`{root}` in a view file stands for the results root (a quoted path literal, substituted by toa.db
because DDL cannot take bound parameters); everything else is plain DuckDB SQL that users can
read and copy. Queries take their values as bound parameters (`?`), never formatted in.
"""

from importlib import resources


def load(name: str) -> str:
    """A view definition file, e.g. load("tables") for sql/tables.sql."""
    return resources.files(__name__).joinpath(f"{name}.sql").read_text(encoding="utf-8")


def query_text(name: str) -> str:
    """A query the code runs, e.g. query_text("report_summary") for sql/queries/report_summary.sql."""
    return resources.files(__name__).joinpath("queries", f"{name}.sql").read_text(encoding="utf-8")
