-- Cost and compute per method for one run (view method_cost, sql/cost.sql): the report's Cost table.
SELECT method, generations, input_tokens, output_tokens, server_seconds, timed_generations, request_seconds,
       money, currency, prefix_cache_hit_rate
FROM method_cost WHERE run_id = ? ORDER BY method
