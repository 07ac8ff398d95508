-- The run's config as recorded at its (latest) start.
SELECT config_json FROM runs WHERE run_id = ? ORDER BY started_at DESC LIMIT 1
