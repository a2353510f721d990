"""Value checks on a merged config; every problem found is reported at once, each naming its key."""

from __future__ import annotations

import importlib.util
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ltdist.config.load import ConfigError
from ltdist.config.schema import Config
from ltdist.data.meta_set import META_SOURCES
from ltdist.engine.fingerprint import WORLD_SIZE, training_settings, world_size_of
from ltdist.engine.speed import MEMORY_FORMATS
from ltdist.methods.objectives import OBJECTIVES
from ltdist.methods.objectives.meta_step import META_INNER, META_INNER_ZERO_GRADIENT
from ltdist.models.resnet_cifar import CIFAR_DEPTHS
from ltdist.models.resnet_imagenet import IMAGENET_SPECS

ARCHS = (*CIFAR_DEPTHS, *IMAGENET_SPECS)
EXTERNAL_BACKBONES = ("timm", "torchvision")  # model.arch=timm:<name> | torchvision:<name>
# A stage is a module of ltdist.stages (see ltdist/stages/__init__.py).
KNOWN_STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(
    [str(Path(__file__).resolve().parents[1] / "stages")])))
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def training_keys() -> list[str]:
    """Every key :func:`ltdist.engine.fingerprint.training_settings` records (for validating
    ``trainer.accept_changed_keys``)."""
    return [key for key in training_settings(OmegaConf.structured(Config)) if key != WORLD_SIZE]


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every out-of-range or inconsistent value."""
    problems: list[str] = []

    def check(key: str, ok: Callable[[Any], bool], expectation: str) -> None:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            problems.append(f"{key}: {expectation}, got {value!r}")

    def one_of(key: str, choices: tuple) -> None:
        check(key, lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")

    positive = lambda v: v is not None and v > 0
    non_negative = lambda v: v is not None and v >= 0
    at_least_one = lambda v: v is not None and v >= 1
    unit_interval = lambda v: v is not None and 0 <= v <= 1

    check("experiment", lambda v: bool(v) and bool(_SAFE_NAME.match(v)), "must be a non-empty name of [A-Za-z0-9._-]")
    check("output.run_id", lambda v: v == "" or bool(_SAFE_NAME.match(v)), "must be empty or a name of [A-Za-z0-9._-]")
    check("output.root", lambda v: bool(v), "must be a non-empty path")

    stages = list(cfg.stages)
    if not stages:
        problems.append("stages: must list at least one stage")
    for name in stages:
        if name not in KNOWN_STAGES:
            problems.append(f"stages: unknown stage {name!r}; known stages: {', '.join(KNOWN_STAGES)}")
    if len(set(stages)) != len(stages):
        problems.append(f"stages: each stage may appear once, got {stages}")

    one_of("data.profile", ("exp", "pareto"))
    check("data.imbalance", lambda v: v is not None and v >= 1, "must be ≥ 1 (n_max / n_min)")
    check("data.val_per_class", non_negative, "must be ≥ 0")
    check("data.image_size", lambda v: v is not None and v >= 8, "must be ≥ 8 pixels")
    one_of("data.channels", (1, 3))
    check("data.num_workers", non_negative, "must be ≥ 0")
    check("data.shuffle_buffer", at_least_one, "must be ≥ 1")
    check("data.max_skip_fraction", unit_interval, "must be in [0, 1]")
    check("data.shards", lambda v: bool(v), "must be a non-empty path")
    excl = cfg.data.exclude_from_training
    if not (excl is None or excl == "few" or (isinstance(excl, ListConfig)
                                              and all(isinstance(c, int) and c >= 0 for c in excl))):
        problems.append(f"data.exclude_from_training: must be null, 'few' or a list of class ids ≥ 0, got {excl!r}")

    arch = cfg.model.arch
    library = arch.split(":", 1)[0] if ":" in arch else None
    if library in EXTERNAL_BACKBONES:
        if importlib.util.find_spec(library) is None:
            problems.append(f"model.arch: {arch!r} needs the package {library!r}, which is not installed")
    elif arch not in ARCHS:
        problems.append(f"model.arch: must be one of {', '.join(ARCHS)}, timm:<name> or torchvision:<name>, "
                        f"got {arch!r}")
    if cfg.model.pretrained and library not in EXTERNAL_BACKBONES:
        problems.append(f"model.pretrained: only timm:<name> / torchvision:<name> backbones fetch their own "
                        f"weights; for model.arch={arch!r} set model.weights=PATH")
    if cfg.model.pretrained and cfg.model.weights:
        problems.append("model.weights: set either model.weights or model.pretrained=true, not both")
    one_of("model.classifier", ("cosine", "linear"))
    check("model.scale_init", positive, "must be > 0")

    check("optim.lr", positive, "learning rate must be > 0")
    one_of("optim.lr_scaling", ("linear", "sqrt", "none"))
    check("optim.lr_reference_batch", at_least_one, "must be ≥ 1")
    check("optim.momentum", lambda v: v is not None and 0 <= v < 1, "must be in [0, 1)")
    check("optim.weight_decay", non_negative, "must be ≥ 0")
    one_of("optim.schedule", ("cosine", "constant"))
    check("optim.warmup_epochs", non_negative, "must be ≥ 0")
    check("optim.grad_clip", non_negative, "must be ≥ 0 (0 disables clipping)")

    check("sampling.power", unit_interval, "must be in [0, 1] (1 instance, 0.5 square root, 0 balanced)")

    check("trainer.epochs", at_least_one, "must be ≥ 1")
    check("trainer.batch_size", at_least_one, "must be ≥ 1")
    check("trainer.grad_accum", at_least_one, "must be ≥ 1")
    check("trainer.max_steps", non_negative, "must be ≥ 0 (0 = all epochs)")
    one_of("trainer.precision", ("fp32", "bf16", "fp16"))
    one_of("trainer.device", ("auto", "cpu", "cuda"))
    one_of("trainer.memory_format", MEMORY_FORMATS)
    check("trainer.log_every", at_least_one, "must be ≥ 1")
    check("trainer.checkpoint_every", at_least_one, "must be ≥ 1")
    check("trainer.max_nonfinite_steps", at_least_one, "must be ≥ 1")
    check("trainer.keep_checkpoints", at_least_one, "must be ≥ 1")
    check("trainer.stall_timeout_s", non_negative, "must be ≥ 0 seconds (0 disables the stall watchdog)")
    known = training_keys()
    for key in cfg.trainer.accept_changed_keys:
        if key not in known:
            problems.append(f"trainer.accept_changed_keys: {key!r} is not a training setting; known: "
                            f"{', '.join(known)}")
    world = world_size_of(cfg)
    batch, accum = cfg.trainer.batch_size, cfg.trainer.grad_accum
    if batch >= 1 and accum >= 1 and world >= 1 and batch % (world * accum) != 0:
        problems.append(f"trainer.batch_size: global batch {batch} is not divisible by world size {world} "
                        f"× trainer.grad_accum {accum}")

    one_of("method.loss", OBJECTIVES)
    check("method.logit_adjusted.tau", non_negative, "must be ≥ 0")
    ks = list(cfg.method.kt.ks)
    if not ks or any(k < 0 for k in ks) or ks != sorted(set(ks)):
        problems.append(f"method.kt.ks: thresholds must be non-negative, strictly increasing, non-empty, got {ks}")
    check("method.kt.tau", positive, "temperature τ must be > 0")
    check("method.kt.linear_scale", positive, "softmax scale must be > 0")
    one_of("method.kt.prototypes_from", ("train", "val"))
    check("method.kt.tau_grid", lambda v: len(v) > 0 and all(t > 0 for t in v), "temperatures must be > 0, non-empty")
    check("method.kt.ks", lambda v: not cfg.method.kt.select_on_val or len(v) <= 6,
          "at most 6 thresholds with select_on_val (every non-empty subset is a candidate)")
    for name in ("crt", "lws"):
        check(f"method.{name}.epochs", at_least_one, "must be ≥ 1")
        check(f"method.{name}.batch_size", at_least_one, "must be ≥ 1")
        check(f"method.{name}.lr", positive, "learning rate must be > 0")
        check(f"method.{name}.momentum", lambda v: v is not None and 0 <= v < 1, "must be in [0, 1)")
        check(f"method.{name}.weight_decay", non_negative, "must be ≥ 0")
        check(f"method.{name}.sampling_power", unit_interval, "must be in [0, 1] (0 class balanced)")
    for name in ("tau_norm", "logit_adjust"):
        check(f"method.{name}.grid", lambda v: len(v) > 0 and all(t >= 0 for t in v), "must be non-empty, each ≥ 0")
        check(f"method.{name}.default", lambda v, n=name: v in list(OmegaConf.select(cfg, f"method.{n}.grid")),
              "must be one of the grid's values")
    mpcl = cfg.method.mpcl
    check("method.mpcl.lam", non_negative, "must be ≥ 0")
    check("method.mpcl.tau", positive, "temperature τ must be > 0")
    check("method.mpcl.momentum", lambda v: v is not None and 0 <= v < 1, "must be in [0, 1)")
    check("method.mpcl.warmup_epochs", non_negative, "must be ≥ 0")
    if mpcl.meta_inner in META_INNER_ZERO_GRADIENT:
        problems.append(f"method.mpcl.meta_inner: {mpcl.meta_inner!r}: {META_INNER_ZERO_GRADIENT[mpcl.meta_inner]}")
    else:
        one_of("method.mpcl.meta_inner", META_INNER)
    if cfg.method.loss == "mpcl" and mpcl.meta_network and mpcl.lam == 0:
        problems.append("method.mpcl.lam: λ = 0 removes L_PC, the only term where the meta-network enters: its "
                        "meta-gradient is identically zero (set method.mpcl.meta_network=false for plain CE)")
    one_of("method.mpcl.meta_optimizer", ("sgd", "sgd_normalised", "adam"))
    check("method.mpcl.meta_init_std", non_negative, "must be ≥ 0 (0 = a zero last layer)")
    check("method.mpcl.meta_lr", positive, "must be > 0")
    check("method.mpcl.meta_hidden", at_least_one, "must be ≥ 1")
    check("method.mpcl.meta_interval", at_least_one, "must be ≥ 1 optimizer step")
    one_of("method.mpcl.meta_source", META_SOURCES)
    check("method.mpcl.meta_per_class", at_least_one, "must be ≥ 1")
    check("method.mpcl.meta_batch_size", non_negative, "must be ≥ 0 (0 = the per-rank micro-batch)")
    if cfg.method.loss == "mpcl" and mpcl.meta_network and cfg.trainer.compile:
        problems.append("trainer.compile: torch.compile cannot run MPCL's meta step (method.mpcl.meta_network=true "
                        "differentiates the loss twice, which compiled graphs do not support): set "
                        "trainer.compile=false, or method.mpcl.meta_network=false")
    if cfg.method.loss == "mpcl" and mpcl.warmup_epochs >= cfg.trainer.epochs:
        problems.append(f"method.mpcl.warmup_epochs: {mpcl.warmup_epochs} CE-only epochs of "
                        f"trainer.epochs={cfg.trainer.epochs}: L_PC would never be switched on")
    alpha = cfg.method.mpfa.alpha
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
        problems.append(f"method.mpfa.alpha: must be a number in [0, 1] or 'auto' (chosen on val), got {alpha!r}")
    check("method.mpfa.beta", non_negative, "must be ≥ 0")
    check("method.mpfa.neighbours", at_least_one, "must be ≥ 1")
    check("method.mpfa.tukey", positive, "Tukey power must be > 0")
    check("method.mpfa.epochs", at_least_one, "must be ≥ 1")
    one_of("method.mpfa.centres", ("meta", "empirical", "auto"))
    one_of("method.mpfa.beta_form", ("identity", "all_entries"))
    one_of("method.mpfa.count", ("balanced", "paper"))
    one_of("method.mpfa.classifier", ("cosine", "linear"))
    check("method.mpfa.scale", positive, "must be > 0")
    check("method.mpfa.batch_size", at_least_one, "must be ≥ 1")
    check("method.mpfa.draw_window", at_least_one, "must be ≥ 1")
    one_of("method.mpfa.precision", ("auto", "fp32", "tf32", "bf16"))
    check("method.mpfa.lr", positive, "learning rate must be > 0")
    check("method.mpfa.momentum", lambda v: v is not None and 0 <= v < 1, "must be in [0, 1)")
    check("method.mpfa.weight_decay", non_negative, "must be ≥ 0")

    check("evaluate.many_threshold", non_negative, "must be ≥ 0")
    check("evaluate.few_threshold", non_negative, "must be ≥ 0")
    check("evaluate.per_class_rows_max", non_negative, "must be ≥ 0 (0: always bin the classes)")
    if cfg.evaluate.few_threshold > cfg.evaluate.many_threshold:
        problems.append(f"evaluate.few_threshold: must be ≤ evaluate.many_threshold "
                        f"({cfg.evaluate.few_threshold} > {cfg.evaluate.many_threshold})")

    one_of("deepspeed.zero_stage", (0, 1, 2))
    if mpcl.meta_inner == "all" and cfg.deepspeed.zero_stage > 2:
        problems.append("method.mpcl.meta_inner: 'all' needs deepspeed.zero_stage ≤ 2")

    check("launch.nodes", at_least_one, "must be ≥ 1")
    check("launch.tasks_per_node", at_least_one, "must be ≥ 1")
    check("launch.gpus_per_node", non_negative, "must be ≥ 0")
    check("launch.cpus_per_task", at_least_one, "must be ≥ 1")
    check("launch.mem_gb", positive, "must be > 0")
    check("launch.time_min", at_least_one, "must be ≥ 1 minute")
    check("launch.max_timeouts", non_negative, "must be ≥ 0")
    check("launch.job_name", lambda v: bool(v) and bool(_SAFE_NAME.match(v)), "must be a name of [A-Za-z0-9._-]")
    gpus, tasks = cfg.launch.gpus_per_node, cfg.launch.tasks_per_node
    if gpus > 0 and tasks != gpus:
        problems.append(f"launch.tasks_per_node: must equal launch.gpus_per_node on GPU nodes "
                        f"(one rank per GPU), got {tasks} tasks for {gpus} GPUs")
    if cfg.trainer.device == "cuda" and gpus == 0:
        problems.append("trainer.device: 'cuda' needs launch.gpus_per_node ≥ 1")

    if problems:
        raise ConfigError(problems)


def config_to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what is saved as ``config.yaml`` in the run directory)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
