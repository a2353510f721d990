"""The training settings a checkpoint is bound to: every key that changes what stage-1 training computes.

A checkpoint records them (``commit.json``); resuming with other values would splice two different runs
(the saved stream position no longer means the same samples, the optimizer state belongs to other
weights), so a resume whose values differ is refused by key, old → new, unless the user lists the key in
``trainer.accept_changed_keys``. Keys left out here may change freely between relaunches: the length of
training (``trainer.epochs``, ``trainer.max_steps``: extending a run), logging and checkpoint cadence,
evaluation, stage-2 methods and the launch resources other than the number of ranks.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

ACCEPT_KEY = "trainer.accept_changed_keys"
# Whole sections, then single keys; data.src (where raw files were read from) does not change the shards.
_SECTIONS = ("model", "data", "sampling", "optim")
_EXCLUDED = {"data.src"}
_KEYS = ("method.loss", "method.logit_adjusted", "method.mpcl", "trainer.batch_size", "trainer.grad_accum",
         "trainer.seed", "trainer.precision", "deepspeed.zero_stage", "deepspeed.extra")
WORLD_SIZE = "world_size"  # ranks (launch.nodes × launch.tasks_per_node): the stream and ZeRO shards depend on it


def world_size_of(cfg: DictConfig) -> int:
    """Ranks the job will have: nodes × tasks per node."""
    return int(cfg.launch.nodes) * int(cfg.launch.tasks_per_node)


def training_settings(cfg: DictConfig, world_size: int | None = None) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` of the training-relevant keys of ``cfg`` (JSON values), plus the number
    of ranks under ``world_size``: the job's actual one when given, else the launch section's."""
    settings: dict[str, Any] = {WORLD_SIZE: world_size if world_size is not None else world_size_of(cfg)}
    for section in _SECTIONS:
        for key, value in OmegaConf.to_container(cfg[section], resolve=True).items():
            if f"{section}.{key}" not in _EXCLUDED:
                settings[f"{section}.{key}"] = value
    for key in _KEYS:
        value = OmegaConf.select(cfg, key)
        settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    return json.loads(json.dumps(settings))  # what commit.json will hold: tuples as lists, keys as strings


def changed_settings(recorded: dict[str, Any], current: dict[str, Any], accepted: list[str]) -> list[str]:
    """``"key: old → new"`` for each recorded key whose value differs and that is not in ``accepted``
    (keys a checkpoint did not record are not compared)."""
    return [f"{key}{' (launch.nodes × launch.tasks_per_node)' if key == WORLD_SIZE else ''}: {json.dumps(old)} → "
            f"{json.dumps(current.get(key))}" for key, old in recorded.items()
            if current.get(key) != old and key not in accepted]


def refusal(directory: str, changes: list[str]) -> str:
    """The message for a refused resume."""
    lines = "\n  ".join(changes)
    keys = [c.split(":")[0] for c in changes if not c.startswith(WORLD_SIZE)]
    accept = f", or accept the change with {ACCEPT_KEY}=[{','.join(keys)}]" if len(keys) == len(changes) else ""
    return (f"the run's checkpoint {directory} was trained with other settings; resuming would splice two runs:\n"
            f"  {lines}\nrelaunch with the recorded values or into a new output.run_id{accept}")
