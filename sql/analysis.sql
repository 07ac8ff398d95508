-- Analysis views: scaling curves, cost, agents, calls, trees and DPO margins, per run and method.
-- They read only the table views of tables.sql (samples, tree_nodes, call_attempts, runs, dpo).
--
-- A sample is SCORED when its generation and its reward both succeeded (status = 'ok',
-- reward_status = 'ok', reward not null); only scored samples are ever ranked. A GENERATION is
-- any sample row except the placeholder a failing method leaves (action = 'method_error'):
-- failed calls and PRS feedback calls spent compute, so they count as generations and tokens.
--
-- Example queries (bind the run id; `toa.db.query(store, sql, [run_id])`):
--
--   -- 1. Best-of-k curves, one column per method (expected best of k random samples):
--   PIVOT (SELECT method, k, best_reward FROM best_of_k WHERE run_id = ?)
--   ON method USING first(best_reward) ORDER BY k;
--
--   -- 2. Quality per token: mean best reward and mean tokens spent per prompt, per method:
--   SELECT method, best_reward, tokens_per_prompt FROM reward_vs_tokens_summary
--   WHERE run_id = ? ORDER BY best_reward DESC;
--
--   -- 3. Which agent wrote the best response, per method:
--   SELECT method, agent, best_prompts, round(share, 3) AS share FROM agent_best_share
--   WHERE run_id = ? ORDER BY method, share DESC;
--
--   -- 4. Did refinement help? Share of refinements that beat the response they refined:
--   SELECT method, sum(refinements) AS refinements, sum(improved) / sum(refinements) AS improve_rate
--   FROM tree_stats WHERE run_id = ? GROUP BY method;

-- Samples that can be ranked: a response with a reward.
CREATE OR REPLACE VIEW scored_samples AS
SELECT * FROM samples
WHERE status = 'ok' AND reward_status = 'ok' AND reward IS NOT NULL;

-- The k axis of the curves, per (run, method): 1..budget. The budget is the configured one
-- (n * number of agents, from runs.config_json), or more where a method spent more generations
-- on a prompt (PRS feedback is one extra call); a run without a `runs` row uses what it observed.
CREATE OR REPLACE VIEW run_budget AS
WITH configured AS (
    SELECT run_id,
           max(TRY_CAST(config_json ->> '$.n' AS BIGINT) * json_array_length(config_json -> '$.agents'))::BIGINT AS budget
    FROM runs GROUP BY run_id
), observed AS (
    SELECT run_id, method, max(n)::BIGINT AS generations
    FROM (SELECT run_id, method, prompt_id, count(*) AS n FROM samples WHERE action <> 'method_error' GROUP BY ALL)
    GROUP BY ALL
)
SELECT o.run_id, o.method, greatest(coalesce(c.budget, 0), o.generations)::BIGINT AS budget
FROM observed o LEFT JOIN configured c USING (run_id);

-- Expected best reward of k samples drawn uniformly without replacement from a prompt's N scored
-- samples, averaged over prompts: the order-free best-of-k curve (it does not depend on which
-- slot a sample happened to be generated in, so its variance is far lower than a prefix's).
-- With the rewards sorted ascending r_(1) <= ... <= r_(N), the max of a k-subset is r_(i) exactly
-- when the subset holds item i and k-1 of the i-1 items below it:
--     E[max of k] = sum_i r_(i) * C(i-1, k-1) / C(N, k)
-- The binomials are taken as exp(lgamma sums): C(N, k) overflows a double beyond N ~ 1000,
-- while the ratio, as a difference of log-gammas, stays exact to ~1e-13 for any practical N.
-- Ties need no care: any order among equal rewards gives the same sum.
-- A prompt with fewer than k scored samples (some calls or scores failed) contributes the best
-- of all it has (k is capped at its N); `prompts` counts the prompts with at least one.
-- `tokens` is the expected cost of those k generations: k * the method's mean tokens
-- (prompt + completion) per generation.
-- Cost: the weight depends only on (i, N, k), so the rewards are first summed per (N, i) over the
-- prompts, and the mean over prompts is sum over (N, i) of that sum * weight / prompts: the
-- terms number (distinct N) * N * k, not prompts * N * k (160 x 160 x a few N for a paper-sized run).
-- The ranks come from each prompt's rewards sorted as a list (a hash aggregate and small sorts),
-- not from a window over all samples (one sort of them all), and every step reads the one before
-- it once: a step read twice would be materialized, and a filter on run_id / method would then no
-- longer reach the Parquet scan (benchmarks/store_scale.py).
CREATE OR REPLACE VIEW best_of_k AS
WITH sorted AS (
    SELECT run_id, method, list_sort(list(reward)) AS rewards
    FROM scored_samples GROUP BY run_id, method, prompt_id
), by_rank AS (
    -- rank i of N (1-based, ascending); `prompts`: how many prompts have that (N, i)
    SELECT run_id, method, n, i, sum(reward) AS reward_sum, count(*) AS prompts
    FROM (SELECT run_id, method, len(rewards) AS n, unnest(range(1, len(rewards) + 1)) AS i,
                 unnest(rewards) AS reward FROM sorted)
    GROUP BY ALL
), grid AS (
    SELECT run_id, method, unnest(range(1, budget + 1)) AS k FROM run_budget
), terms AS (
    SELECT g.run_id, g.method, g.k, r.reward_sum, r.i, r.n, least(g.k, r.n) AS kk, r.prompts
    FROM grid g JOIN by_rank r USING (run_id, method)
), curve AS (
    SELECT run_id, method, k,
           sum(CASE WHEN i >= kk THEN reward_sum * exp(
                   lgamma(i) - lgamma(kk) - lgamma(i - kk + 1)            -- log C(i-1, kk-1)
                   - (lgamma(n + 1) - lgamma(kk + 1) - lgamma(n - kk + 1)) -- log C(n, kk)
               ) ELSE 0 END) AS reward_total,
           sum(prompts) FILTER (WHERE i = 1) AS prompts  -- every scored prompt has one rank 1
    FROM terms GROUP BY ALL
), cost AS (
    SELECT run_id, method, avg(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) AS tokens_per_generation
    FROM samples WHERE action <> 'method_error' GROUP BY ALL
)
SELECT c.run_id, c.method, c.k, c.reward_total / c.prompts AS best_reward, c.prompts::BIGINT AS prompts,
       (c.k * t.tokens_per_generation)::DOUBLE AS tokens
FROM curve c JOIN cost t USING (run_id, method)
ORDER BY c.run_id, c.method, c.k;

-- The reference's curve: the best reward among the FIRST k generations in the method's
-- generation order (`order`), averaged over prompts. This is what a method would have returned
-- had it been stopped after k generations, so it is the fair curve for sequential methods (TOA,
-- PRS, MoA), where later samples build on earlier ones. Failed generations count towards k (the
-- call was spent) but not towards the best. A prompt with fewer than k generations contributes
-- its final best; one with no scored sample yet is left out of the mean (`prompts` counts the
-- rest). `tokens` is the mean prompt + completion tokens of those first k generations.
CREATE OR REPLACE VIEW best_of_k_prefix AS
WITH g AS (
    SELECT run_id, method, prompt_id,
           row_number() OVER w AS pos,
           max(CASE WHEN status = 'ok' AND reward_status = 'ok' THEN reward END) OVER w AS best_so_far,
           sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) OVER w AS tokens_so_far,
           count(*) OVER (PARTITION BY run_id, method, prompt_id) AS n
    FROM samples
    WHERE action <> 'method_error'
    WINDOW w AS (PARTITION BY run_id, method, prompt_id ORDER BY "order", sample_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
), grid AS (
    SELECT run_id, method, unnest(range(1, budget + 1)) AS k FROM run_budget
)
SELECT grid.run_id, grid.method, grid.k, avg(g.best_so_far) AS best_reward,
       count(g.best_so_far)::BIGINT AS prompts, avg(g.tokens_so_far)::DOUBLE AS tokens
FROM grid JOIN g ON g.run_id = grid.run_id AND g.method = grid.method AND g.pos = least(grid.k, g.n)
GROUP BY ALL
ORDER BY grid.run_id, grid.method, grid.k;

-- Per prompt: the best reward a method reached and every token it spent to get there.
CREATE OR REPLACE VIEW reward_vs_tokens AS
SELECT run_id, method, prompt_id,
       max(reward) FILTER (WHERE status = 'ok' AND reward_status = 'ok') AS best_reward,
       count(*)::BIGINT AS generations,
       sum(coalesce(prompt_tokens, 0))::BIGINT AS prompt_tokens,
       sum(coalesce(completion_tokens, 0))::BIGINT AS completion_tokens,
       sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))::BIGINT AS tokens
FROM samples
WHERE action <> 'method_error'
GROUP BY ALL;

-- Per method: mean best reward against mean tokens per prompt (the end point of the curves).
CREATE OR REPLACE VIEW reward_vs_tokens_summary AS
SELECT run_id, method, count(*)::BIGINT AS prompts, avg(best_reward) AS best_reward,
       avg(tokens)::DOUBLE AS tokens_per_prompt, sum(tokens)::BIGINT AS tokens
FROM reward_vs_tokens
GROUP BY ALL
ORDER BY run_id, method;

-- Share of prompts whose best response (argmax reward, first in generation order on ties, the
-- same choice as the SFT set) came from each agent. Agents that took part but never won show 0.
CREATE OR REPLACE VIEW agent_best_share AS
WITH best AS (
    SELECT run_id, method, prompt_id, agent FROM scored_samples
    QUALIFY row_number() OVER (PARTITION BY run_id, method, prompt_id ORDER BY reward DESC, "order", sample_id) = 1
), agents AS (
    SELECT DISTINCT run_id, method, agent FROM samples WHERE action <> 'method_error'
), totals AS (
    SELECT run_id, method, count(*) AS prompts FROM best GROUP BY ALL
), wins AS (
    SELECT run_id, method, agent, count(*) AS best_prompts FROM best GROUP BY ALL
)
SELECT a.run_id, a.method, a.agent, coalesce(w.best_prompts, 0)::BIGINT AS best_prompts,
       t.prompts::BIGINT AS prompts, coalesce(w.best_prompts, 0) / t.prompts AS share
FROM agents a JOIN totals t USING (run_id, method) LEFT JOIN wins w USING (run_id, method, agent)
ORDER BY a.run_id, a.method, a.agent;

-- Calls per (run, method, agent), seen two ways:
--   from samples: the generations the method used (calls), replayed from the call cache, failed
--     (error_rate = call_errors / calls), tokens, and latency of the successful ones;
--   from call_attempts (joined on call_key = sample_id): every attempt made for those samples,
--     retries and failures included, with their latency. A replayed sample brings its original
--     attempts along, so attempts describe how the samples were made, not this run's traffic.
CREATE OR REPLACE VIEW call_stats AS
WITH gen AS (
    SELECT * FROM samples WHERE action <> 'method_error'
), s AS (
    SELECT run_id, method, agent,
           count(*)::BIGINT AS calls,
           count(*) FILTER (WHERE cached)::BIGINT AS replayed,
           count(*) FILTER (WHERE status <> 'ok')::BIGINT AS call_errors,
           count(*) FILTER (WHERE status = 'ok' AND reward_status = 'error')::BIGINT AS reward_errors,
           sum(coalesce(prompt_tokens, 0))::BIGINT AS prompt_tokens,
           sum(coalesce(completion_tokens, 0))::BIGINT AS completion_tokens,
           avg(latency_s) FILTER (WHERE status = 'ok') AS latency_mean_s,
           quantile_cont(latency_s, 0.5) FILTER (WHERE status = 'ok') AS latency_p50_s,
           quantile_cont(latency_s, 0.95) FILTER (WHERE status = 'ok') AS latency_p95_s
    FROM gen GROUP BY ALL
), a AS (
    SELECT g.run_id, g.method, g.agent,
           count(*)::BIGINT AS attempts,
           count(*) FILTER (WHERE c.status <> 'ok')::BIGINT AS failed_attempts,
           avg(c.latency_s) AS attempt_latency_mean_s,
           quantile_cont(c.latency_s, 0.5) AS attempt_latency_p50_s,
           quantile_cont(c.latency_s, 0.95) AS attempt_latency_p95_s
    FROM (SELECT DISTINCT run_id, method, agent, sample_id FROM gen) g
    JOIN call_attempts c ON c.call_key = g.sample_id
    GROUP BY ALL
)
SELECT s.run_id, s.method, s.agent, s.calls, s.replayed, s.call_errors,
       s.call_errors / s.calls AS error_rate, s.reward_errors, s.prompt_tokens, s.completion_tokens,
       s.latency_mean_s, s.latency_p50_s, s.latency_p95_s,
       coalesce(a.attempts, 0)::BIGINT AS attempts, coalesce(a.failed_attempts, 0)::BIGINT AS failed_attempts,
       a.failed_attempts / a.attempts AS attempt_error_rate,
       a.attempt_latency_mean_s, a.attempt_latency_p50_s, a.attempt_latency_p95_s
FROM s LEFT JOIN a USING (run_id, method, agent)
ORDER BY s.run_id, s.method, s.agent;

-- Generations per depth (samples.depth: the layer or tree depth a method gave each sample).
CREATE OR REPLACE VIEW tree_widths AS
SELECT run_id, method, prompt_id, depth, count(*)::BIGINT AS width
FROM samples WHERE action <> 'method_error'
GROUP BY ALL;

-- Per (run, method, prompt): how deep and wide the method went, and how often a refinement (a
-- sample with parent_id) scored above the response it refined (both scored; `improve_rate` =
-- improved / refinements). `depths` and `widths` are parallel lists (depth i has widths[i]).
-- `nodes` / `node_depth` describe the stored search tree (TOA), null for other methods.
CREATE OR REPLACE VIEW tree_stats AS
WITH shape AS (
    SELECT run_id, method, prompt_id, max(depth)::BIGINT AS depth, max(width)::BIGINT AS max_width,
           list(depth ORDER BY depth) AS depths, list(width ORDER BY depth) AS widths
    FROM tree_widths GROUP BY ALL
), parents AS (
    -- one row per sample id, so that a (never expected) duplicate cannot double a refinement
    SELECT DISTINCT ON (run_id, method, prompt_id, sample_id) run_id, method, prompt_id, sample_id, reward
    FROM scored_samples
), refine AS (
    SELECT c.run_id, c.method, c.prompt_id,
           count(*)::BIGINT AS refinements,
           count(*) FILTER (WHERE c.reward > p.reward)::BIGINT AS improved
    FROM scored_samples c
    JOIN parents p ON p.run_id = c.run_id AND p.method = c.method AND p.prompt_id = c.prompt_id
                  AND p.sample_id = c.parent_id
    GROUP BY ALL
), nodes AS (
    SELECT run_id, method, prompt_id, count(*)::BIGINT AS nodes, max(depth)::BIGINT AS node_depth
    FROM tree_nodes GROUP BY ALL
)
SELECT s.run_id, s.method, s.prompt_id, s.depth, s.max_width, s.depths, s.widths,
       coalesce(r.refinements, 0)::BIGINT AS refinements, coalesce(r.improved, 0)::BIGINT AS improved,
       r.improved / r.refinements AS improve_rate, n.nodes, n.node_depth
FROM shape s
LEFT JOIN refine r USING (run_id, method, prompt_id)
LEFT JOIN nodes n USING (run_id, method, prompt_id);

-- Per pair: how much better the chosen response scored than the rejected one.
CREATE OR REPLACE VIEW dpo_margins AS
SELECT run_id, method, prompt_id, chosen_id, rejected_id, chosen_agent, rejected_agent,
       chosen_reward, rejected_reward, rejected_rank, chosen_reward - rejected_reward AS margin
FROM dpo;

-- Per (run, method): the distribution of those margins.
CREATE OR REPLACE VIEW dpo_margin_summary AS
SELECT run_id, method, count(*)::BIGINT AS pairs, avg(margin) AS mean_margin,
       quantile_cont(margin, 0.5) AS p50_margin, min(margin) AS min_margin, max(margin) AS max_margin
FROM dpo_margins
GROUP BY ALL
ORDER BY run_id, method;
