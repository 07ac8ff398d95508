-- Comparisons with error bars: best-of-k curves with bootstrap confidence intervals over prompts,
-- and paired comparisons of two methods of a run at equal budget. They read the table view
-- `samples` (tables.sql) and `run_budget` (analysis.sql).
--
-- The bootstrap resamples PROMPTS (their per-prompt values, never the samples themselves): the
-- statistic, a mean over prompts, is recomputed on each of `resamples` resamples, and the interval
-- is the percentile interval: the 2.5 % and 97.5 % quantiles of those values (quantile_cont), 95 %.
-- A resample holds each prompt a random number of times with replacement, drawn from Poisson(1):
-- the Poisson bootstrap (Hanley & MacGibbon, Comput. Methods Programs Biomed. 83:57, 2006), which
-- for more than a few dozen prompts behaves as drawing P of the P prompts (whose counts are
-- Multinomial(P, 1/P), each nearly Poisson(1)); the resample's size varies around P, and its mean
-- is sum(count * value) / sum(count). Prompt p's count in resample b = 0 .. resamples - 1 is
-- bootstrap_count(hash(xor(hash(prompt_id, seed), b))): a function of the resample and the prompt
-- alone (hash(b, h) of two arguments would not do: DuckDB combines the two hashes so simply that
-- resamples draw alike and the intervals come out too narrow), so
-- * the same data gives the same interval, and the same estimates, on every query (DuckDB's hash()
--   is fixed for a DuckDB version, and every sum runs over a list in one prompt order), and a
--   prompt has the same count in a resample for every method (paired);
-- * a resample is one list of counts in a fixed prompt order, and each mean two list inner
--   products. Drawing P prompts as hash(b, j) % P instead needs those draws counted or joined back
--   per prompt: resamples x prompts rows, 15-35 s at 10k prompts x 1000 resamples on 2 cores,
--   where the lists take about 1 s (measured when these views were written).
-- A resample that holds none of the prompts (likely only with a handful of them) has no mean and
-- is left out; `resamples` counts those used.
--
-- Resamples (default 1000) and seed (default 2412) can be changed for one connection:
--   SET VARIABLE toa_bootstrap_resamples = 200; SET VARIABLE toa_bootstrap_seed = 7;
--
-- Example queries (bind the run id; `toa.db.query(store, sql, [run_id])`):
--
--   -- 1. Best of k with its 95 % interval, per method, at every k (and the first-k curve's):
--   SELECT method, k, best_reward, best_reward_lo, best_reward_hi, prefix_reward, prefix_reward_lo,
--          prefix_reward_hi, completion_tokens, server_s FROM best_of_k_ci WHERE run_id = ?;
--
--   -- 2. Which method wins at equal budget, and by how much:
--   SELECT method_a, method_b, prompts, win_rate, win_rate_lo, win_rate_hi, mean_diff, mean_diff_lo, mean_diff_hi
--   FROM method_comparison WHERE run_id = ? AND method_a < method_b;

-- The bootstrap's parameters for this connection.
CREATE OR REPLACE VIEW bootstrap_settings AS
SELECT coalesce(TRY_CAST(getvariable('toa_bootstrap_resamples') AS BIGINT), 1000) AS resamples,
       coalesce(TRY_CAST(getvariable('toa_bootstrap_seed') AS BIGINT), 2412) AS seed;

-- How many times a resample holds a prompt: Poisson(1) by inversion of a 64-bit hash h (uniform
-- on 0 .. 2^64 - 1): the count is how many of the thresholds 2^64 * P(X <= m), m = 0..9, h reaches
-- (capped at 10, which a count exceeds with probability 1e-8).
CREATE OR REPLACE MACRO bootstrap_count(h) AS
    (h >= 6786177901268885504::UBIGINT)::INTEGER + (h >= 13572355802537771008::UBIGINT)::INTEGER
    + (h >= 16965444753172213760::UBIGINT)::INTEGER + (h >= 18096474403383695360::UBIGINT)::INTEGER
    + (h >= 18379231815936565248::UBIGINT)::INTEGER + (h >= 18435783298447138816::UBIGINT)::INTEGER
    + (h >= 18445208545532233728::UBIGINT)::INTEGER + (h >= 18446555009401532416::UBIGINT)::INTEGER
    + (h >= 18446723317385195520::UBIGINT)::INTEGER + (h >= 18446742018272268288::UBIGINT)::INTEGER;

-- Resample b's count of each prompt, from the prompts' hashes (in the caller's prompt order).
CREATE OR REPLACE MACRO bootstrap_counts(hashes, b) AS
    list_transform(list_transform(hashes, lambda h: hash(xor(h, b::UBIGINT))), lambda u: bootstrap_count(u)::DOUBLE);

-- Per (run, method, prompt) and k = 1 .. budget: what the method reached with k generations.
-- * best_reward: the expected best reward of k of the prompt's scored samples drawn at random
--   (as best_of_k in analysis.sql, whose mean over prompts it gives; null without a scored sample);
-- * prefix_reward: the best reward among its first k generations in generation order (`order`;
--   as best_of_k_prefix; null while none of them is scored);
-- * completion_tokens, server_s: the completion tokens and server seconds of those first k
--   generations (failed ones included: they were spent). A prompt with fewer than k generations
--   gives its totals.
-- Server seconds: the only timing recorded is a call's latency_s (calls / call_attempts, copied
-- into samples.latency_s): the client's wall-clock seconds from sending the request to having the
-- whole response (toa.calls.CallLayer._fill), queueing and network included. (calls.server_s
-- holds a server's own time where it reports one, see sql/cost.sql; the curves keep the latency,
-- known for every call, so that runs with and without it compare.) One request returns n generations (`generate(agent, messages, n)`) and each
-- of them records the request's latency, so a generation is charged latency_s / n: the
-- generations of one prompt and agent that share a latency_s are taken as one request (two
-- requests measure the same double only by chance). A replayed (cached) generation is charged
-- its original call's time, as it is charged its tokens. Failed earlier attempts of a call
-- (call_attempts) are not charged: they are not part of the sample.
CREATE OR REPLACE VIEW prompt_curves AS
WITH gen AS (
    SELECT run_id, method, prompt_id, "order", sample_id,
           CASE WHEN status = 'ok' AND reward_status = 'ok' THEN reward END AS scored,
           coalesce(completion_tokens, 0) AS completion_tokens,
           coalesce(latency_s, 0) / count(*) OVER (PARTITION BY run_id, method, prompt_id, agent, latency_s) AS server_s
    FROM samples WHERE action <> 'method_error'
), prefix AS (
    SELECT run_id, method, prompt_id, scored,
           row_number() OVER w AS pos,
           max(scored) OVER w AS prefix_reward,
           sum(completion_tokens) OVER w AS completion_tokens,
           sum(server_s) OVER w AS server_s
    FROM gen
    WINDOW w AS (PARTITION BY run_id, method, prompt_id ORDER BY "order", sample_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
), per_prompt AS (
    -- one row per prompt: its scored rewards sorted ascending, and the running values by position
    SELECT run_id, method, prompt_id, count(*) AS generations,
           coalesce(list_sort(list(scored) FILTER (WHERE scored IS NOT NULL)), []) AS rewards,
           list(prefix_reward ORDER BY pos) AS prefix_rewards,
           list(completion_tokens ORDER BY pos) AS tokens,
           list(server_s ORDER BY pos) AS seconds
    FROM prefix GROUP BY ALL
), grid AS (
    SELECT run_id, method, unnest(range(1, budget + 1)) AS k FROM run_budget
), weights AS (
    -- per (n scored, k <= n): P(rank i is the best of a random k-subset) = C(i-1, k-1) / C(n, k),
    -- as best_of_k in analysis.sql, one list over i = 1..n; k > n uses k = n
    SELECT run_id, method, n, k, list(CASE WHEN i < k THEN 0.0 ELSE exp(
               lgamma(i) - lgamma(k) - lgamma(i - k + 1) - (lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1))) END
           ORDER BY i) AS weights
    FROM run_budget, range(1, budget + 1) rn(n), range(1, n + 1) rk(k), range(1, n + 1) ri(i)
    GROUP BY ALL
)
SELECT p.run_id, p.method, p.prompt_id, g.k,
       list_inner_product(p.rewards, w.weights) AS best_reward,
       p.prefix_rewards[least(g.k, p.generations)] AS prefix_reward,
       p.tokens[least(g.k, p.generations)]::DOUBLE AS completion_tokens,
       p.seconds[least(g.k, p.generations)] AS server_s
FROM per_prompt p
JOIN grid g USING (run_id, method)
LEFT JOIN weights w ON w.run_id = p.run_id AND w.method = p.method AND w.n = len(p.rewards) AND w.k = least(g.k, w.n);

-- Best of k with 95 % bootstrap intervals over prompts, per (run, method, k), for both curves:
-- * best_reward: the expected best reward of k random samples (equal to best_of_k.best_reward);
-- * prefix_reward: the best reward among the first k generations (best_of_k_prefix.best_reward);
-- each with _lo and _hi, and the mean cost of the first k generations in generation order
-- (completion_tokens, server_s: means over the prompts of prompt_curves' columns), the curves'
-- other x axes. `prompts`: the prompts with a generation, the population a resample draws from
-- (each mean skips a prompt without a value, as best_of_k and best_of_k_prefix do).
-- How: per (run, method), every k's values in one list, all in the same prompt order; a resample's
-- counts are one list in that order too, so its mean at each k is two list inner products
-- (sum(count * value) / sum(count * has value)): resamples x budget inner products of length
-- prompts, done in DuckDB's list functions rather than as resamples x prompts x budget rows.
CREATE OR REPLACE VIEW best_of_k_ci AS
WITH curves AS (
    SELECT c.*, hash(c.prompt_id, s.seed) AS prompt_hash FROM prompt_curves c, bootstrap_settings s
), by_k AS (
    SELECT run_id, method, k, count(*) AS prompts,
           list_avg(list(best_reward ORDER BY prompt_hash)) AS best_reward,
           list_avg(list(prefix_reward ORDER BY prompt_hash)) AS prefix_reward,
           list_avg(list(completion_tokens ORDER BY prompt_hash)) AS completion_tokens,
           list_avg(list(server_s ORDER BY prompt_hash)) AS server_s,
           list(prompt_hash ORDER BY prompt_hash) AS hashes,
           list(coalesce(best_reward, 0) ORDER BY prompt_hash) AS best,
           list((best_reward IS NOT NULL)::DOUBLE ORDER BY prompt_hash) AS has_best,
           list(coalesce(prefix_reward, 0) ORDER BY prompt_hash) AS prefix,
           list((prefix_reward IS NOT NULL)::DOUBLE ORDER BY prompt_hash) AS has_prefix
    FROM curves GROUP BY ALL
), per_curve AS (
    -- one row per (run, method): every k's lists (a prompt has a row at every k, so the prompt
    -- order, `hashes`, is the same at every k)
    SELECT run_id, method, list(k ORDER BY k) AS ks, any_value(hashes) AS hashes,
           list(best ORDER BY k) AS best, list(has_best ORDER BY k) AS has_best,
           list(prefix ORDER BY k) AS prefix, list(has_prefix ORDER BY k) AS has_prefix
    FROM by_k GROUP BY ALL
), resampled AS (
    -- per resample: its count of each prompt (a list in the prompt order), then at each k the mean
    -- over the prompts with a value: sum(count * value) / sum(count * has value)
    SELECT run_id, method, b, ks,
           list_transform(best, lambda x: list_inner_product(counts, x)) AS best_sums,
           list_transform(has_best, lambda x: list_inner_product(counts, x)) AS best_weights,
           list_transform(prefix, lambda x: list_inner_product(counts, x)) AS prefix_sums,
           list_transform(has_prefix, lambda x: list_inner_product(counts, x)) AS prefix_weights
    FROM (SELECT *, bootstrap_counts(hashes, b) AS counts
          FROM (SELECT p.*, unnest(range(s.resamples)) AS b FROM per_curve p, bootstrap_settings s))
), intervals AS (
    SELECT run_id, method, k, count(best_reward) AS resamples,
           quantile_cont(best_reward, 0.025) AS best_reward_lo, quantile_cont(best_reward, 0.975) AS best_reward_hi,
           quantile_cont(prefix_reward, 0.025) AS prefix_reward_lo, quantile_cont(prefix_reward, 0.975) AS prefix_reward_hi
    FROM (SELECT run_id, method, k, best_sum / nullif(best_weight, 0) AS best_reward,
                 prefix_sum / nullif(prefix_weight, 0) AS prefix_reward
          FROM (SELECT run_id, method, unnest(ks) AS k, unnest(best_sums) AS best_sum, unnest(best_weights) AS best_weight,
                       unnest(prefix_sums) AS prefix_sum, unnest(prefix_weights) AS prefix_weight
                FROM resampled))
    GROUP BY ALL
)
SELECT p.run_id, p.method, p.k, p.prompts::BIGINT AS prompts,
       p.best_reward, i.best_reward_lo, i.best_reward_hi,
       p.prefix_reward, i.prefix_reward_lo, i.prefix_reward_hi,
       p.completion_tokens, p.server_s, coalesce(i.resamples, 0)::BIGINT AS resamples
FROM by_k p LEFT JOIN intervals i USING (run_id, method, k)
ORDER BY p.run_id, p.method, p.k;

-- Paired comparison of every two methods of a run (ordered pairs, a method with itself included)
-- at equal budget: k = the smaller of their two budgets (run_budget), and per prompt that both
-- answered, the best reward among each method's first k generations in generation order (each
-- one's final best when the budgets are equal, as §0.2 of docs/methods.md has them).
-- * win_rate: mean over prompts of 1 when A's best beats B's, 1/2 on a tie (equal rewards), 0
--   when it loses; wins / ties / losses count the prompts;
-- * mean_diff: mean over prompts of A's best minus B's best.
-- Each with its 95 % bootstrap interval; both intervals come from the same resamples, and B vs A
-- mirrors A vs B (win_rate 1 - x, mean_diff -x). Every pair is computed whichever are asked for
-- (filters stop at the per-run lists): one list of counts per resample for the run's prompts, then
-- three list inner products per pair and resample.
CREATE OR REPLACE VIEW method_comparison AS
WITH per_prompt AS (
    -- one row per (run, method, prompt): its rewards in generation order (null: not scored)
    SELECT run_id, method, prompt_id,
           list(CASE WHEN status = 'ok' AND reward_status = 'ok' THEN reward END ORDER BY "order", sample_id) AS rewards
    FROM samples WHERE action <> 'method_error'
    GROUP BY ALL
), pairs AS (
    SELECT a.run_id, a.method AS method_a, b.method AS method_b, a.prompt_id, least(ba.budget, bb.budget) AS k,
           list_max(a.rewards[1:least(ba.budget, bb.budget)]) AS best_a,
           list_max(b.rewards[1:least(ba.budget, bb.budget)]) AS best_b
    FROM per_prompt a
    JOIN per_prompt b ON b.run_id = a.run_id AND b.prompt_id = a.prompt_id
    JOIN run_budget ba ON ba.run_id = a.run_id AND ba.method = a.method
    JOIN run_budget bb ON bb.run_id = b.run_id AND bb.method = b.method
), scored AS (
    SELECT *, CASE WHEN best_a > best_b THEN 1.0 WHEN best_a = best_b THEN 0.5 ELSE 0.0 END AS win,
           best_a - best_b AS diff
    FROM pairs WHERE best_a IS NOT NULL AND best_b IS NOT NULL
), hashed AS (
    SELECT r.*, hash(r.prompt_id, s.seed) AS prompt_hash FROM scored r, bootstrap_settings s
), point AS (
    SELECT run_id, method_a, method_b, any_value(k) AS k, count(*) AS prompts,
           count(*) FILTER (WHERE win = 1) AS wins, count(*) FILTER (WHERE win = 0.5) AS ties,
           count(*) FILTER (WHERE win = 0) AS losses, list_avg(list(win ORDER BY prompt_hash)) AS win_rate,
           list_avg(list(diff ORDER BY prompt_hash)) AS mean_diff
    FROM hashed GROUP BY ALL
), dense AS (
    -- every pair at every prompt of its run (in one prompt order): win and diff where both
    -- methods scored the prompt, else 0 with has = 0
    SELECT pr.run_id, pr.method_a, pr.method_b, list(coalesce(h.win, 0) ORDER BY p.prompt_hash) AS wins,
           list(coalesce(h.diff, 0) ORDER BY p.prompt_hash) AS diffs,
           list((h.win IS NOT NULL)::DOUBLE ORDER BY p.prompt_hash) AS has
    FROM (SELECT DISTINCT run_id, method_a, method_b FROM hashed) pr
    JOIN (SELECT DISTINCT run_id, prompt_hash FROM hashed) p USING (run_id)
    LEFT JOIN hashed h ON h.run_id = pr.run_id AND h.method_a = pr.method_a AND h.method_b = pr.method_b
                      AND h.prompt_hash = p.prompt_hash
    GROUP BY ALL
), per_run AS (
    -- one row per run: its prompts in that order, and every pair's lists
    SELECT d.run_id, p.hashes, list(d.method_a ORDER BY d.method_a, d.method_b) AS methods_a,
           list(d.method_b ORDER BY d.method_a, d.method_b) AS methods_b,
           list(d.wins ORDER BY d.method_a, d.method_b) AS wins, list(d.diffs ORDER BY d.method_a, d.method_b) AS diffs,
           list(d.has ORDER BY d.method_a, d.method_b) AS has
    FROM dense d
    JOIN (SELECT run_id, list(DISTINCT prompt_hash ORDER BY prompt_hash) AS hashes FROM hashed GROUP BY ALL) p USING (run_id)
    GROUP BY ALL
), resampled AS (
    -- per resample: its count of each prompt of the run (drawn once for every pair), then per pair
    -- sum(count * win) / sum(count * has) and the same for diff
    SELECT run_id, methods_a, methods_b,
           list_transform(wins, lambda x: list_inner_product(counts, x)) AS win_sums,
           list_transform(diffs, lambda x: list_inner_product(counts, x)) AS diff_sums,
           list_transform(has, lambda x: list_inner_product(counts, x)) AS weights
    FROM (SELECT *, bootstrap_counts(hashes, b) AS counts
          FROM (SELECT p.*, unnest(range(s.resamples)) AS b FROM per_run p, bootstrap_settings s))
), intervals AS (
    SELECT run_id, method_a, method_b, count(win_rate) AS resamples,
           quantile_cont(win_rate, 0.025) AS win_rate_lo, quantile_cont(win_rate, 0.975) AS win_rate_hi,
           quantile_cont(mean_diff, 0.025) AS mean_diff_lo, quantile_cont(mean_diff, 0.975) AS mean_diff_hi
    FROM (SELECT run_id, method_a, method_b, win_sum / nullif(weight, 0) AS win_rate, diff_sum / nullif(weight, 0) AS mean_diff
          FROM (SELECT run_id, unnest(methods_a) AS method_a, unnest(methods_b) AS method_b, unnest(win_sums) AS win_sum,
                       unnest(diff_sums) AS diff_sum, unnest(weights) AS weight
                FROM resampled))
    GROUP BY ALL
)
SELECT p.run_id, p.method_a, p.method_b, p.k::BIGINT AS k, p.prompts::BIGINT AS prompts,
       p.wins::BIGINT AS wins, p.ties::BIGINT AS ties, p.losses::BIGINT AS losses,
       p.win_rate, i.win_rate_lo, i.win_rate_hi, p.mean_diff, i.mean_diff_lo, i.mean_diff_hi,
       coalesce(i.resamples, 0)::BIGINT AS resamples
FROM point p LEFT JOIN intervals i USING (run_id, method_a, method_b)
ORDER BY p.run_id, p.method_a, p.method_b;
