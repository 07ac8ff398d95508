-- Paired comparison of every two methods of the run at equal budget, each pair once (A < B; B vs A
-- mirrors it), with 95 % bootstrap intervals (the report's pairwise table).
SELECT method_a, method_b, k, prompts, wins, ties, losses, win_rate, win_rate_lo, win_rate_hi,
       mean_diff, mean_diff_lo, mean_diff_hi, resamples
FROM method_comparison WHERE run_id = ? AND method_a < method_b ORDER BY method_a, method_b
