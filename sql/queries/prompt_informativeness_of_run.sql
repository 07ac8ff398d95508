-- Every informativeness metric of each prompt of a run; toa.evolve picks the configured one.
SELECT prompt_id, mean, variance, max_min, max_mean, best_minus_second
FROM prompt_informativeness WHERE run_id = ?
