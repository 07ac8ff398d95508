-- Best reward of the first k generations, per method (the report's dashed curves).
SELECT method, k, best_reward, tokens, prompts FROM best_of_k_prefix WHERE run_id = ? ORDER BY method, k
