"""The engine: how a run happens. The frozen run spec and its hash, execution in worker processes with their
limits and the model's transfer back, evaluation, metrics and memory, records, and the base-merge cache. It runs
methods through the registry and imports none of them."""
