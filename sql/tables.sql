-- One view per stored table, over every Parquet shard of that table.
-- Call and reward records are deduplicated by their content key (a success wins over an
-- error, then the earliest), so a shard written twice after a crash never shows twice.

CREATE OR REPLACE VIEW calls AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY call_key ORDER BY (status = 'ok') DESC, created_at) AS rn
    FROM read_parquet({root} || '/calls/**/*.parquet', union_by_name = true, hive_partitioning = false)
) WHERE rn = 1;

-- Every attempt, failed ones included: what `calls` collapses.
CREATE OR REPLACE VIEW call_attempts AS
SELECT * FROM read_parquet({root} || '/calls/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW rewards AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY reward_key ORDER BY (status = 'ok') DESC, created_at) AS rn
    FROM read_parquet({root} || '/rewards/**/*.parquet', union_by_name = true, hive_partitioning = false)
) WHERE rn = 1;

CREATE OR REPLACE VIEW samples AS
SELECT * FROM read_parquet({root} || '/samples/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW tree_nodes AS
SELECT * FROM read_parquet({root} || '/tree_nodes/**/*.parquet', union_by_name = true, hive_partitioning = false);

-- step_mcts: value-model training targets (state = prompt + steps so far, mean verified outcome).
CREATE OR REPLACE VIEW value_targets AS
SELECT * FROM read_parquet({root} || '/value_targets/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW prompts AS
SELECT DISTINCT ON (source, prompt_id) *
FROM read_parquet({root} || '/prompts/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW skipped_rows AS
SELECT DISTINCT * FROM read_parquet({root} || '/skipped_rows/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW runs AS
SELECT * FROM read_parquet({root} || '/runs/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW sft AS
SELECT * FROM read_parquet({root} || '/sft/**/*.parquet', union_by_name = true, hive_partitioning = false);

CREATE OR REPLACE VIEW dpo AS
SELECT * FROM read_parquet({root} || '/dpo/**/*.parquet', union_by_name = true, hive_partitioning = false);

-- Optima two-agent dialogues (method `optima`): one row per dialogue, its utterances are
-- samples (utterance_ids, root to leaf, are their sample_ids).
CREATE OR REPLACE VIEW dialogues AS
SELECT * FROM read_parquet({root} || '/dialogues/**/*.parquet', union_by_name = true, hive_partitioning = false);
