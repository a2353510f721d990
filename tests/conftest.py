"""Shared fixtures: the local Slurm cluster and a one-rank gloo process group, each set up once per session.

The process group is session-wide because DeepSpeed caches the world group it first sees: a second
init after a shutdown in the same process leaves that cache pointing at a destroyed group.
"""

import os
import socket

import pytest
from slurm_fixtures import local_slurm_cluster  # noqa: F401  (a fixture, found by name)

from ltdist.distributed import init_distributed, shutdown_distributed
from ltdist.engine.ds_ops import isolate_torch_extensions


@pytest.fixture(scope="session")
def env():
    """This process as rank 0 of a one-rank gloo group (CPU); torch extensions from the prebuilt copy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    isolate_torch_extensions()  # DeepSpeed's op from the prebuilt copy, not built again in the user's cache
    yield init_distributed("cpu")
    shutdown_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
