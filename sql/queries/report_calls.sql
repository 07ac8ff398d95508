SELECT method, agent, calls, replayed, error_rate, prompt_tokens, completion_tokens,
       latency_p50_s, latency_p95_s, attempts, attempt_error_rate
FROM call_stats WHERE run_id = ? ORDER BY method, agent
