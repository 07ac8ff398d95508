-- The columns of every shard under the given globs, one row per shard, each column as
-- "name TYPE [converted type]" in name order: toa.db reads a table whose shards all have the
-- table's columns without union_by_name (views bind from one shard, not from every one).
SELECT file_name, list(name || ' ' || type || coalesce(' ' || converted_type, '') ORDER BY name) AS columns
FROM parquet_schema(?)
WHERE num_children IS NULL
GROUP BY file_name
