-- Per method at equal budget for one run: the report's Methods table (toa.report) and the
-- run's summary artifact (tasks/report.py).
SELECT * EXCLUDE (run_id) FROM method_summary WHERE run_id = ?
