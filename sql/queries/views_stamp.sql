-- Which view definitions a database file holds (see sql/stamp.sql).
SELECT ddl_sha256 FROM toa_views
