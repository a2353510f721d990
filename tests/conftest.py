"""Shared fixtures: the local Slurm cluster is registered once for the whole session."""

from slurm_fixtures import local_slurm_cluster  # noqa: F401  (a fixture, found by name)
