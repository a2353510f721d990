"""Shared fixtures: the local Slurm cluster and a one-rank gloo process group, each set up once per session;
a module's ``workdir`` whose ``shards/`` is the session's Fashion-MNIST-LT (built once, not per module).

The process group is session-wide because DeepSpeed caches the world group it first sees: a second
init after a shutdown in the same process leaves that cache pointing at a destroyed group.
"""

import os
import socket

import pytest
from data_fixtures import fmnist_lt, workdir  # noqa: F401  (fixtures, found by name)
from slurm_fixtures import local_slurm_cluster  # noqa: F401  (a fixture, found by name)

from ltdist.distributed import init_distributed, shutdown_distributed
from ltdist.engine.ds_ops import isolate_torch_extensions


@pytest.fixture(scope="session")
def _one_rank_group():
    """The session's one-rank gloo group; the rank variables are set only while it is created."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    variables = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    isolate_torch_extensions()  # DeepSpeed's op from the prebuilt copy, not built again in the user's cache
    try:
        dist_env = init_distributed("cpu")
    finally:  # later tests start jobs of their own: they must not inherit these ranks
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield dist_env, variables
    shutdown_distributed()


@pytest.fixture
def env(_one_rank_group, monkeypatch):
    """This process as rank 0 of the one-rank gloo group (CPU), with the rank variables set for the test."""
    dist_env, variables = _one_rank_group
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    return dist_env
