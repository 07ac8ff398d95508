-- Prompt evolution (toa.evolve, flow `toa-evolve`): provenance of every evolved prompt and the
-- per-prompt informativeness the selection reads.
--
--   -- which run sampled which prompt set, per iteration of an evolve loop:
--   SELECT iteration, run_id, prompts, evolved, selected FROM evolve_iterations WHERE evolve_id = ? ORDER BY iteration;
--   -- the evolved prompts of iteration 1 with their parents and rewrite chain:
--   SELECT prompt_id, parent_prompt_id, kinds, text FROM evolutions WHERE iteration = 1 AND status = 'ok';
--   -- why rewrites were rejected:
--   SELECT reason, count(*) FROM evolutions WHERE status <> 'ok' GROUP BY ALL;

-- One row per evolution step (status 'ok' = kept, 'rejected' with the filter's reason, 'error'
-- for a failed call). A rerun rewrites the same shard, so rows never double.
CREATE OR REPLACE VIEW evolutions AS
SELECT * FROM read_parquet({root} || '/evolutions/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW evolve_iterations AS
SELECT * FROM read_parquet({root} || '/evolve_iterations/**/*.parquet', union_by_name = true, hive_partitioning = false);

-- Informativeness of each prompt of a run, over the scored samples of every method (EVA's
-- metrics; toa.evolve.informativeness computes the same numbers): mean, population variance,
-- max - min, max - mean, and best - second best (0 with a single sample).
CREATE OR REPLACE VIEW prompt_informativeness AS
SELECT run_id, prompt_id, count(*)::BIGINT AS samples,
       avg(reward) AS mean,
       var_pop(reward) AS variance,
       max(reward) - min(reward) AS max_min,
       max(reward) - avg(reward) AS max_mean,
       CASE WHEN count(*) > 1
            THEN list_sort(list(reward), 'DESC')[1] - list_sort(list(reward), 'DESC')[2]
            ELSE 0.0 END AS best_minus_second
FROM samples
WHERE status = 'ok' AND reward_status = 'ok' AND reward IS NOT NULL
GROUP BY ALL;
