SELECT * EXCLUDE (run_id) FROM reward_vs_tokens_summary WHERE run_id = ?
