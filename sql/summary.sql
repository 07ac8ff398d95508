-- Per-prompt and per-method summaries: the comparison of methods at equal budget.

-- Best and mean reward per (run, method, prompt), over samples whose generation and reward succeeded.
CREATE OR REPLACE VIEW prompts_best AS
SELECT run_id, method, prompt_id,
       max(reward) FILTER (WHERE status = 'ok' AND reward_status = 'ok') AS best_reward,
       avg(reward) FILTER (WHERE status = 'ok' AND reward_status = 'ok') AS mean_reward,
       count(*) FILTER (WHERE action <> 'method_error') AS generations,
       count(*) FILTER (WHERE status = 'error' OR reward_status = 'error') AS errors
FROM samples
GROUP BY ALL;

-- The per-method table the flow publishes as an artifact. One pass over the samples, per prompt
-- and then per method (the same numbers as counting the samples and averaging prompts_best, at
-- half the reading: benchmarks/store_scale.py).
CREATE OR REPLACE VIEW method_summary AS
WITH per_prompt AS (
    SELECT run_id, method, prompt_id,
           max(reward) FILTER (WHERE status = 'ok' AND reward_status = 'ok') AS best_reward,
           avg(reward) FILTER (WHERE status = 'ok' AND reward_status = 'ok') AS mean_reward,
           count(*) FILTER (WHERE action <> 'method_error') AS generations,
           count(*) FILTER (WHERE status <> 'ok') AS generation_errors,
           count(*) FILTER (WHERE status = 'ok' AND reward_status = 'error') AS reward_errors,
           sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens
    FROM samples GROUP BY ALL
)
SELECT run_id, method, count(prompt_id) AS prompts, round(avg(best_reward), 4) AS best_reward,
       round(avg(mean_reward), 4) AS mean_reward, sum(generations)::BIGINT AS generations,
       sum(generation_errors)::BIGINT AS generation_errors, sum(reward_errors)::BIGINT AS reward_errors,
       sum(prompt_tokens)::BIGINT AS prompt_tokens, sum(completion_tokens)::BIGINT AS completion_tokens
FROM per_prompt
GROUP BY ALL
ORDER BY run_id, method;
