"""Sweeps: methods x suites x seeds x hyperparameter grid as independent jobs, and the executors that run them
(local processes, submitit, Slurm)."""
