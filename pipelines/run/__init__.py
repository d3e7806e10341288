"""A run around the stages: start or resume it, commit shard by shard, keep the replicas' ledger, summarise,
report, plan and submit. Imports nothing heavy at package level: the Airflow worker imports `submit` alone."""
