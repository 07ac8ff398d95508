-- Verifiable sources only (verdicts exist): accuracy at budget k with the per-sample accuracy.
SELECT a.method, a.k, a.best_of_k, a.majority_vote, a.pass_at_k, a.prompts, s.sample_accuracy
FROM accuracy_at_budget a JOIN accuracy_summary s USING (run_id, method)
WHERE a.run_id = ? ORDER BY a.method, a.k
