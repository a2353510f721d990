"""The configuration schema: one dataclass per section, merged by OmegaConf as a structured config.

Every key a user can set lives here with its default, or in a dataclass of the method that owns it, which
a section composes (the decoupling baselines' ``RetrainConfig``, ``PostHocConfig`` and ``NCMConfig`` live
in :mod:`ltdist.methods.decoupling`). Presets in ``configs/`` and ``key=value``
overrides are merged on top; unknown keys and wrong types are rejected by OmegaConf, value ranges
by :mod:`ltdist.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ltdist.count_bins import PER_CLASS_ROWS_MAX
from ltdist.methods.decoupling import NCMConfig, PostHocConfig, RetrainConfig


@dataclass
class DataConfig:
    name: str = "fmnist_lt"
    # Directory holding index.json and the train-/val-/test-*.tar shards (relative to the cwd).
    shards: str = "data/fmnist_lt"
    # Shard writer format used when `shards` has no index.json yet (see `ltdist shards --help`).
    format: str = "fashion-mnist"
    # Raw source directory for the writer; empty = the format's default location.
    src: str = ""
    profile: str = "exp"  # exp | pareto
    imbalance: float = 1000.0  # imbalance factor IF = n_max / n_min
    val_per_class: int = 20
    image_size: int = 28  # side of the network input, pixels
    channels: int = 1
    num_workers: int = 2  # data-loader workers per rank
    shuffle_buffer: int = 2000  # samples
    max_skip_fraction: float = 0.01  # corrupt/invalid samples tolerated before the run stops
    # Classes withheld from backbone training (continual setting): null, "few" (the classes with fewer than
    # evaluate.few_threshold training images), or a list of class ids.
    exclude_from_training: Any = None


@dataclass
class ModelConfig:
    # resnet20|32|44|56|110 (CIFAR-style, small images), resnet50|101|152, resnext50_32x4d
    arch: str = "resnet32"
    classifier: str = "cosine"  # cosine | linear
    scale_init: float = 16.0  # the cosine head's scale s at initialisation (KT, linear head: method.kt.linear_scale)
    learn_scale: bool = True
    # A state dict file loaded into the backbone before training (torchvision's .pth files for the ResNets,
    # an ltdist run's weights/final.pt, a timm/torchvision backbone's own file); the head stays new. Without
    # a train stage, extract embeds with it directly (frozen backbone). Empty: random initialisation.
    weights: str = ""
    # timm:/torchvision: backbones only: the library's own pretrained weights (fetched by the library).
    pretrained: bool = False


@dataclass
class OptimConfig:
    lr: float = 0.1  # base learning rate at `lr_reference_batch`
    lr_scaling: str = "linear"  # linear | sqrt | none: effective lr from the global batch
    lr_reference_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables


@dataclass
class SamplingConfig:
    # Target class probability q_j ∝ n_j^power: 1 instance, 0.5 square root, 0 class balanced.
    power: float = 0.5


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 128  # global batch (all ranks, one optimizer step)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # Speed options (ltdist.engine.speed). auto: channels_last on CUDA, contiguous on the CPU.
    memory_format: str = "auto"  # auto | channels_last | contiguous
    cudnn_benchmark: bool = True  # cuDNN times its convolution algorithms once per input shape (CUDA)
    tf32: bool = True  # TF32 tensor cores for fp32 matrix products and convolutions (CUDA, Ampere and later)
    compile: bool = False  # torch.compile of the backbone; not with MPCL's meta step (method.mpcl.meta_network)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 20  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (and at every epoch end)
    max_nonfinite_steps: int = 5  # consecutive non-finite losses that stop the run
    keep_checkpoints: int = 2  # newest verified checkpoints kept on disk
    progress: bool = True  # tqdm bar on rank 0 when attached to a terminal
    # A rank that makes no training progress for this long (a hung or stopped peer, a stuck collective) logs
    # which rank stalled and where it waits, then fails the job; 0 disables the watchdog.
    stall_timeout_s: float = 600.0
    # When checkpoints exist but none verifies (corrupt, truncated), train from step 0 instead of refusing.
    allow_restart_from_scratch: bool = False
    # Training settings (ltdist.engine.fingerprint) that may differ from the checkpoint's on resume,
    # e.g. [optim.lr]. trainer.epochs and trainer.max_steps may always change (extending a run).
    accept_changed_keys: list[str] = field(default_factory=list)


@dataclass
class KTConfig:
    ks: list[int] = field(default_factory=lambda: [0, 20, 100])  # count thresholds k, sorted
    tau: float = 10.0  # attention temperature
    prototypes_from: str = "train"  # train | val
    # Also choose τ (from tau_grid) and the ensemble's k (a non-empty subset of ks) on val: classifiers/kt_val.pt.
    select_on_val: bool = False
    tau_grid: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0, 50.0])
    # Softmax scale s of KT's cosine classifiers on a backbone with a linear head (a cosine head gives its
    # own learned s).
    linear_scale: float = 16.0


@dataclass
class LogitAdjustedConfig:
    tau: float = 1.0  # τ of the logit-adjusted loss: logits + τ·log π_j (1.0 = balanced softmax)


@dataclass
class MPCLConfig:
    lam: float = 0.5  # weight λ of the prototype contrastive loss
    tau: float = 0.07  # temperature of the prototype contrastive loss
    momentum: float = 0.999  # EMA momentum m of the class prototypes
    warmup_epochs: int = 5  # CE-only epochs before L_PC is switched on (prototypes are updated throughout)
    meta_network: bool = True  # false: CE + L_PC with the empirical EMA prototypes (no meta step)
    meta_inner: str = "last_stage"  # last_stage | all: parameters of the virtual SGD step
    # sgd (eq. 7: Θ ← Θ − meta_lr·∇Θ) | sgd_normalised (eq. 7's direction, a step of length meta_lr:
    # Θ ← Θ − meta_lr·∇Θ/‖∇Θ‖) | adam
    meta_optimizer: str = "sgd"
    meta_lr: float = 1e-3  # step size of the meta-network Θ
    meta_hidden: int = 256  # hidden width of the meta-network
    meta_init_std: float = 0.0  # std of the normal init of C's last layer (0: zeros, ĉ = c at the start)
    meta_interval: int = 1  # optimizer steps between meta steps
    meta_source: str = "val"  # val | train: where the balanced meta set comes from (never test)
    meta_per_class: int = 10  # images per class in the balanced meta set
    meta_batch_size: int = 0  # images per meta batch and rank; 0 = the per-rank micro-batch


@dataclass
class MPFAConfig:
    """Stage ``mpfa``: meta-prototype feature augmentation and the balanced classifier retrain."""

    centres: str = "auto"  # meta | empirical | auto (meta-prototypes of an MPCL run when present)
    # Calibration strength α of eq. 10: a number in [0, 1] (default 0.2, the paper's initial value), or
    # "auto": one retrain per α in ALPHA_GRID, the best mean per-class top-1 on val kept (never test).
    alpha: Any = 0.2
    beta: float = 0.05  # spread β of eq. 10
    beta_form: str = "identity"  # identity: + β·I | all_entries: + β in every entry of Σ
    neighbours: int = 3  # M: neighbour classes with more samples
    tukey: float = 0.5  # Tukey power λ (1.0 = off)
    literal_inv_m: bool = False  # the paper's extra 1/M in front of the softmax weights
    count: str = "balanced"  # balanced: every class to N_1 | paper: max(⌈N_1/N_k − 1⌉, 1) per real feature
    baseline_row: bool = True  # with meta centres, also retrain on empirical centres (TailCalibX-style row)
    classifier: str = "cosine"  # cosine | linear
    scale: float = 16.0  # cosine classifier logit scale s (fixed)
    epochs: int = 10  # classifier retrain epochs
    batch_size: int = 512  # global batch of real + generated features (all ranks, one step)
    # Items per draw window: each rank draws the generated features of its share of a window in one sampler
    # call (one GEMM per class term, the larger the faster); memory per rank ≈ draw_window / ranks × d × 4 B
    # (+ the GEMM's rows of the largest class). The epoch stays fully shuffled whatever the value.
    draw_window: int = 65536
    # sampler GEMMs: fp32 | tf32 (CUDA) | bf16 (fp32 accumulation) | auto: tf32 on CUDA, else fp32
    precision: str = "auto"
    lr: float = 0.05  # SGD learning rate (cosine decay to 0 over the retrain)
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class MethodConfig:
    # Stage-1 training objective: ce | balanced_softmax | logit_adjusted | mpcl (ltdist.methods.objectives).
    # Stage-2 methods are stages (kt, mpfa, crt, ...) listed in `stages`.
    loss: str = "ce"
    logit_adjusted: LogitAdjustedConfig = field(default_factory=LogitAdjustedConfig)
    kt: KTConfig = field(default_factory=KTConfig)
    mpcl: MPCLConfig = field(default_factory=MPCLConfig)
    mpfa: MPFAConfig = field(default_factory=MPFAConfig)
    # Stage-2 baselines on the frozen backbone (stages crt, tau_norm, lws, ncm, logit_adjust).
    crt: RetrainConfig = field(default_factory=RetrainConfig)
    lws: RetrainConfig = field(default_factory=lambda: RetrainConfig(epochs=5))  # classifier-balancing's cls_lws
    tau_norm: PostHocConfig = field(default_factory=PostHocConfig)  # τ of w_i / ‖w_i‖^τ
    logit_adjust: PostHocConfig = field(default_factory=PostHocConfig)  # τ of scores − τ · log π
    ncm: NCMConfig = field(default_factory=NCMConfig)


@dataclass
class EvaluateConfig:
    many_threshold: int = 100  # many-shot: n > many_threshold
    few_threshold: int = 20  # few-shot: n < few_threshold; medium otherwise
    # Most classes report.md lists one row each (and plots one point each); with more, it shows classes
    # binned by training count instead. per_class_accuracy.json / .csv always hold every class.
    per_class_rows_max: int = PER_CLASS_ROWS_MAX


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 | 1 | 2
    # Raw DeepSpeed config keys merged last into the generated dict (advanced use).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LaunchConfig:
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node (one per GPU on GPU nodes)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0  # per node
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "ltdist"
    # Extra sbatch options, e.g. {exclusive: true, mail-type: END}.
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # Time-outs after which submitit stops requeueing (its slurm_max_num_timeout); preemptions are requeued
    # without limit (submitit does not count them).
    max_timeouts: int = 3


@dataclass
class OutputConfig:
    root: str = "runs"  # runs/<experiment>/<run_id>/
    run_id: str = ""  # empty: a timestamp is chosen at launch


@dataclass
class Config:
    experiment: str = "default"
    # Stages run in order by every job: doctor, train, extract, then stage-2 stages (kt, mpfa, crt, tau_norm, lws,
    # ncm, logit_adjust), evaluate.
    stages: list[str] = field(default_factory=lambda: ["train", "extract", "kt", "evaluate"])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
