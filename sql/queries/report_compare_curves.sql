-- Best of k with 95 % bootstrap intervals, per method (the report's bands): the expected best of k
-- random samples and the best of the first k generations, with the cost of those first k.
SELECT method, k, prompts, best_reward, best_reward_lo, best_reward_hi, prefix_reward, prefix_reward_lo,
       prefix_reward_hi, completion_tokens, server_s, resamples
FROM best_of_k_ci WHERE run_id = ? ORDER BY method, k
