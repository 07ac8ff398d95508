-- Written last into a results database: a hash of the view definitions above it (root path
-- included; taken as they are in sql/, before toa.db turns union_by_name off for the tables whose
-- shards all have the same columns). toa.db reads it before using the file and, when it differs
-- from its own (an older toa wrote the file, or the root moved), builds the views in memory instead.
CREATE OR REPLACE VIEW toa_views AS SELECT {stamp} AS ddl_sha256;
