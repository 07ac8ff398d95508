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

-- The per-method table the flow publishes as an artifact.
CREATE OR REPLACE VIEW method_summary AS
WITH s AS (
    SELECT run_id, method,
           count(DISTINCT prompt_id) AS prompts,
           count(*) FILTER (WHERE action <> 'method_error') AS generations,
           count(*) FILTER (WHERE status <> 'ok') AS generation_errors,
           count(*) FILTER (WHERE status = 'ok' AND reward_status = 'error') AS reward_errors,
           sum(prompt_tokens)::BIGINT AS prompt_tokens,
           sum(completion_tokens)::BIGINT AS completion_tokens
    FROM samples GROUP BY ALL
), p AS (
    SELECT run_id, method, avg(best_reward) AS best_reward, avg(mean_reward) AS mean_reward
    FROM prompts_best GROUP BY ALL
)
SELECT s.run_id, s.method, s.prompts, round(p.best_reward, 4) AS best_reward,
       round(p.mean_reward, 4) AS mean_reward, s.generations, s.generation_errors, s.reward_errors,
       s.prompt_tokens, s.completion_tokens
FROM s JOIN p USING (run_id, method)
ORDER BY s.run_id, s.method;
