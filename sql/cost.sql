-- Cost and compute per run and method: tokens, server seconds, money at the agents' prices, and
-- the prefix-cache hit rate of the servers while each method ran.
--
-- A GENERATION here is a sample whose call succeeded (status = 'ok'), replayed ones included:
-- the numbers are what the method's data cost to make, whoever paid for it (the progress bar's
-- projection, toa.units.calls_cost, counts only the calls a run makes). Failed calls cost nothing.
-- The n choices of one request share its prompt and its server time: each choice counts a
-- 1 / request_choices share of them (calls.request_choices; null, in calls recorded before it
-- was kept, counts as 1).
--
--   -- cost and compute per method of one run
--   SELECT method, input_tokens, output_tokens, server_seconds, money, currency, prefix_cache_hit_rate
--   FROM method_cost WHERE run_id = ? ORDER BY method;

-- Prefix-cache use per (method, batch) unit attempt and server (rows.PrefixCacheRow, written by
-- toa.engine): the growth of vLLM's vllm:prefix_cache_queries_total / _hits_total (prompt
-- tokens looked up / found in the cache) between the attempt's start and end; null where the
-- server publishes no such counter. The counters are the server's: units running at once on one
-- server (several batches or methods in flight) each see the others' lookups too, so a unit's
-- numbers are exact only when it had the server to itself.
CREATE OR REPLACE VIEW prefix_cache AS
SELECT * FROM read_parquet({root} || '/prefix_cache/**/*.parquet', union_by_name = true, hive_partitioning = false);

-- The price of each priced agent of a run (AgentConfig.price), from the run's latest `runs` row
-- (prices are operational: a resumed run may change them).
CREATE OR REPLACE VIEW agent_prices AS
WITH latest AS (
    SELECT run_id, arg_max(config_json, started_at) AS config_json FROM runs GROUP BY run_id
), agents AS (
    SELECT run_id, unnest(from_json(config_json -> '$.agents', '["JSON"]')) AS agent FROM latest
)
SELECT run_id, agent ->> '$.alias' AS agent,
       TRY_CAST(agent ->> '$.price.input_per_1m' AS DOUBLE) AS input_per_1m,
       TRY_CAST(agent ->> '$.price.output_per_1m' AS DOUBLE) AS output_per_1m,
       TRY_CAST(agent ->> '$.price.gpu_hour' AS DOUBLE) AS gpu_hour,
       coalesce(TRY_CAST(agent ->> '$.price.gpus' AS BIGINT), 1) AS gpus,
       agent ->> '$.price.currency' AS currency
FROM agents
WHERE json_type(agent -> '$.price') = 'OBJECT';

-- Per (run, method, agent). input_tokens: prompt tokens, a request's prompt once however many
-- choices it had. server_seconds: the servers' own time (calls.server_s, queue wait excluded),
-- summed over the generations whose server reported it (timed_generations of them); null when
-- none did. request_seconds: server_s where reported, else the client-measured latency_s (which
-- adds the network and the server's queue). money: input_per_1m x input_tokens / 1e6 +
-- output_per_1m x output_tokens / 1e6 + gpu_hour x gpus x request_seconds / 3600 at the agent's
-- price (toa.config.Price.call_cost), 0 for an agent without one; null when the run prices no
-- agent or prices them in different currencies. The GPU-hour part prices each request as if it
-- had the server alone: requests batched together overlap, so it is an upper bound there.
CREATE OR REPLACE VIEW agent_cost AS
WITH generation AS (
    SELECT s.run_id, s.method, s.agent, s.prompt_tokens, s.completion_tokens,
           1.0::DOUBLE / coalesce(c.request_choices, 1) AS share, c.server_s,
           coalesce(c.server_s, c.latency_s, s.latency_s) AS seconds
    FROM samples s LEFT JOIN calls c ON c.call_key = s.sample_id AND c.status = 'ok'
    WHERE s.status = 'ok' AND s.action <> 'method_error'
), run_currency AS (
    SELECT run_id, any_value(currency) AS currency FROM agent_prices GROUP BY run_id
    HAVING count(DISTINCT currency) = 1
)
SELECT g.run_id, g.method, g.agent, count(*) AS generations,
       round(sum(g.prompt_tokens * g.share))::BIGINT AS input_tokens,
       sum(g.completion_tokens)::BIGINT AS output_tokens,
       sum(g.server_s * g.share) AS server_seconds,
       count(g.server_s) AS timed_generations,
       sum(g.seconds * g.share) AS request_seconds,
       CASE WHEN any_value(r.currency) IS NOT NULL THEN
           sum(coalesce(p.input_per_1m, 0) * g.prompt_tokens * g.share / 1e6
               + coalesce(p.output_per_1m, 0) * g.completion_tokens / 1e6
               + coalesce(p.gpu_hour, 0) * coalesce(p.gpus, 1) * g.seconds * g.share / 3600)
       END AS money,
       any_value(r.currency) AS currency
FROM generation g
LEFT JOIN agent_prices p USING (run_id, agent)
LEFT JOIN run_currency r USING (run_id)
GROUP BY g.run_id, g.method, g.agent;

-- Per (run, method): agent_cost summed, with the prefix-cache hit rate of its units (hits /
-- queries over all its unit attempts and servers; null without counters, or with no lookup).
-- Shared servers make the hit rate that of everything they served meanwhile (see prefix_cache).
CREATE OR REPLACE VIEW method_cost AS
WITH cache AS (
    SELECT run_id, method, sum(queries) AS cache_queries, sum(hits) AS cache_hits
    FROM prefix_cache GROUP BY run_id, method
), per_method AS (
    SELECT run_id, method, sum(generations)::BIGINT AS generations, sum(input_tokens)::BIGINT AS input_tokens,
           sum(output_tokens)::BIGINT AS output_tokens, sum(server_seconds) AS server_seconds,
           sum(timed_generations)::BIGINT AS timed_generations, sum(request_seconds) AS request_seconds,
           sum(money) AS money, any_value(currency) AS currency
    FROM agent_cost GROUP BY run_id, method
)
SELECT m.*, c.cache_queries, c.cache_hits, c.cache_hits / nullif(c.cache_queries, 0) AS prefix_cache_hit_rate
FROM per_method m LEFT JOIN cache c USING (run_id, method)
ORDER BY m.run_id, m.method;
