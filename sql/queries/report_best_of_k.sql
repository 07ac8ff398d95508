-- Expected best reward of k random samples, per method (the report's solid curves).
SELECT method, k, best_reward, tokens, prompts FROM best_of_k WHERE run_id = ? ORDER BY method, k
