SELECT method, agent, best_prompts, prompts, share FROM agent_best_share WHERE run_id = ? ORDER BY method, agent
