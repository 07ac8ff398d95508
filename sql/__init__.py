"""The SQL of toa: DuckDB view definitions over the Parquet shards, one file per concern.

`{root}` in a file stands for the results root (a quoted path literal, substituted by toa.db
because DDL cannot take bound parameters); everything else is plain DuckDB SQL that users can
read and copy.
"""

from importlib import resources


def load(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.sql").read_text(encoding="utf-8")
