"""The real-Slurm tests run only under `make test-slurm` (which starts a single-node cluster and sets
MERGEBENCH_SLURM=1 and SLURM_CONF); in the normal test run they are skipped."""

import os
import shutil
import subprocess

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MERGEBENCH_SLURM") == "1":
        return
    skip = pytest.mark.skip(reason="needs a Slurm cluster: run `make test-slurm` (sets MERGEBENCH_SLURM=1)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The cluster `make test-slurm` started: fail (not skip) when MERGEBENCH_SLURM=1 and it does not answer."""
    for tool in ("sbatch", "squeue", "scancel", "scontrol"):
        assert shutil.which(tool), f"{tool} is not installed (make test-slurm installs it)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0 and "UP" in ping.stdout, f"slurmctld does not answer: {ping.stdout}{ping.stderr}"
    return os.environ.get("SLURM_CONF")
