-- Accuracy of verifiable prompt sources (GSM8K- and MATH-style: prompts.preset / answer_format):
-- every generation's extracted answer and whether it equals the gold (table `verdicts`, written
-- by the flow with toa.reward.math_verify whatever reward model scored the samples), and
-- accuracy at a budget of k generations per prompt, per method.
--
--   -- accuracy curves, one row per (method, k):
--   SELECT method, k, best_of_k, majority_vote, pass_at_k FROM accuracy_at_budget WHERE run_id = ? ORDER BY method, k;

CREATE OR REPLACE VIEW verdicts AS
SELECT * FROM read_parquet({root} || '/verdicts/**/*.parquet', union_by_name = true, hive_partitioning = false);

-- Generations with a verdict, in generation order (pos, 1-based), with their reward.
CREATE OR REPLACE VIEW judged_samples AS
SELECT s.run_id, s.method, s.prompt_id, s.sample_id, s.agent, s."order", s.reward, s.reward_status,
       v.answer, v.correct,
       row_number() OVER (PARTITION BY s.run_id, s.method, s.prompt_id ORDER BY s."order", s.sample_id) AS pos,
       count(*) OVER (PARTITION BY s.run_id, s.method, s.prompt_id) AS n
FROM samples s JOIN verdicts v USING (run_id, method, prompt_id, sample_id)
WHERE s.status = 'ok';

-- Per method: the plain share of correct generations, and of prompts with at least one.
CREATE OR REPLACE VIEW accuracy_summary AS
SELECT run_id, method, count(DISTINCT prompt_id)::BIGINT AS prompts, count(*)::BIGINT AS generations,
       avg(correct::DOUBLE) AS sample_accuracy,
       count(DISTINCT prompt_id) FILTER (WHERE correct)::DOUBLE / count(DISTINCT prompt_id) AS any_correct
FROM judged_samples GROUP BY ALL ORDER BY run_id, method;

-- Accuracy at a budget of k generations per prompt (k = 1 .. the run's budget), mean over prompts:
-- * best_of_k: the response the REWARD MODEL ranks first among k samples drawn at random (the
--   expectation over all k-subsets, as best_of_k in analysis.sql: the i-th smallest reward is the
--   subset's best with weight C(i-1, k-1) / C(N, k)). Ties in reward are broken uniformly at
--   random, which in expectation is the tie group's mean correctness. Only samples with a reward.
-- * majority_vote: the most frequent extracted answer among the FIRST k generations (generation
--   order; ties go to the answer given first); generations with no answer do not vote.
-- * pass_at_k: an oracle bound, the chance that k random samples hold a correct one
--   (1 - C(N - c, k) / C(N, k)).
-- A prompt with fewer than k judged generations uses all it has (k capped at N).
CREATE OR REPLACE VIEW accuracy_at_budget AS
WITH grid AS (
    SELECT b.run_id, b.method, unnest(range(1, b.budget + 1)) AS k
    FROM run_budget b WHERE EXISTS (SELECT 1 FROM judged_samples j WHERE j.run_id = b.run_id AND j.method = b.method)
), scored AS (
    SELECT run_id, method, prompt_id, reward,
           avg(correct::DOUBLE) OVER (PARTITION BY run_id, method, prompt_id, reward) AS c_tie,
           row_number() OVER (PARTITION BY run_id, method, prompt_id ORDER BY reward) AS i,
           count(*) OVER (PARTITION BY run_id, method, prompt_id) AS n
    FROM judged_samples WHERE reward_status = 'ok' AND reward IS NOT NULL
), by_rank AS (
    SELECT run_id, method, n, i, sum(c_tie) AS c_sum FROM scored GROUP BY ALL
), scored_prompts AS (
    SELECT run_id, method, count(DISTINCT prompt_id) AS prompts FROM scored GROUP BY ALL
), bok AS (
    SELECT t.run_id, t.method, t.k, sum(CASE WHEN t.i >= t.kk THEN t.c_sum * exp(
               lgamma(t.i) - lgamma(t.kk) - lgamma(t.i - t.kk + 1)
               - (lgamma(t.n + 1) - lgamma(t.kk + 1) - lgamma(t.n - t.kk + 1))) ELSE 0 END) / any_value(p.prompts) AS best_of_k
    FROM (SELECT g.run_id, g.method, g.k, r.n, r.i, r.c_sum, least(g.k, r.n) AS kk
          FROM grid g JOIN by_rank r USING (run_id, method)) t
    JOIN scored_prompts p USING (run_id, method)
    GROUP BY ALL
), per_prompt AS (
    SELECT run_id, method, prompt_id, any_value(n) AS n, count(*) FILTER (WHERE correct) AS c
    FROM judged_samples GROUP BY ALL
), pak AS (
    SELECT g.run_id, g.method, g.k, avg(CASE WHEN pp.n - pp.c < least(g.k, pp.n) THEN 1.0 ELSE 1.0 - exp(
               lgamma(pp.n - pp.c + 1) - lgamma(least(g.k, pp.n) + 1) - lgamma(pp.n - pp.c - least(g.k, pp.n) + 1)
               - (lgamma(pp.n + 1) - lgamma(least(g.k, pp.n) + 1) - lgamma(pp.n - least(g.k, pp.n) + 1))) END) AS pass_at_k,
           count(*)::BIGINT AS prompts
    FROM grid g JOIN per_prompt pp USING (run_id, method)
    GROUP BY ALL
), votes AS (
    SELECT g.run_id, g.method, g.k, j.prompt_id, j.answer, count(*) AS votes, min(j.pos) AS first_pos,
           bool_or(j.correct) AS correct
    FROM grid g JOIN judged_samples j ON j.run_id = g.run_id AND j.method = g.method AND j.pos <= g.k
    WHERE j.answer IS NOT NULL
    GROUP BY ALL
), winners AS (
    SELECT run_id, method, k, prompt_id, correct,
           row_number() OVER (PARTITION BY run_id, method, k, prompt_id ORDER BY votes DESC, first_pos) AS rk
    FROM votes
), maj AS (
    SELECT run_id, method, k, count(*) FILTER (WHERE rk = 1 AND correct) AS right_prompts FROM winners GROUP BY ALL
)
SELECT pak.run_id, pak.method, pak.k, bok.best_of_k,
       coalesce(maj.right_prompts, 0)::DOUBLE / pak.prompts AS majority_vote,
       pak.pass_at_k, pak.prompts
FROM pak LEFT JOIN bok USING (run_id, method, k) LEFT JOIN maj USING (run_id, method, k)
ORDER BY pak.run_id, pak.method, pak.k;
