SELECT * EXCLUDE (run_id) FROM dpo_margin_summary WHERE run_id = ?
