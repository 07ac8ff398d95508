-- Per method, over its trees: mean depth and width, and how often a refinement beat its parent.
SELECT method, avg(depth) AS mean_depth, avg(max_width) AS mean_max_width,
       sum(refinements)::BIGINT AS refinements, sum(improved)::BIGINT AS improved,
       sum(improved) / nullif(sum(refinements), 0) AS improve_rate
FROM tree_stats WHERE run_id = ? GROUP BY method ORDER BY method
