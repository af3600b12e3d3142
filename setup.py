"""The package list, which pyproject.toml cannot compute under a renamed root: the package ``mergebench`` is the
folder bench/ with every subpackage in it, and ``mergebench.methods`` the folder methods/ (``package-dir`` in
pyproject.toml maps both)."""

from setuptools import find_packages, setup

setup(packages=["mergebench", *(f"mergebench.{p}" for p in find_packages("bench")), "mergebench.methods"])
