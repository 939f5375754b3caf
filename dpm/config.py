"""Typed schema of the Hydra configuration, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `schema` first in its defaults, so every group file is merged onto these
dataclasses: a misspelt key or a value of the wrong type fails at composition with Hydra's own
message. Semantic checks (ranges, names) live in `validate`, run before any work starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from dpm.core import SCHEDULES, RectifyConfig
from dpm.data import DATASET_NAMES
from dpm.errors import UserError
from dpm.models import MODEL_NAMES
from dpm.stages import stage_for
from dpm.stages.base import RECTIFY_FIELDS

#: The Hydra config tree (conf/ beside the package).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    name: str = MISSING
    # CIFAR ResNets only: 1x1-conv projection (DepGraph's ResNet-56) or zero-padding shortcuts.
    shortcut: Optional[str] = None
    # VGGs only: `mlp` (512-512-512-classes, OTOv2) or `linear` (one Linear(512, classes), Gate Decorator).
    classifier: Optional[str] = None
    # Optional state_dict to start from (e.g. a torchvision checkpoint on disk); never downloaded.
    weights: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: Optional[str] = None
    num_classes: int = MISSING
    in_channels: int = 3
    image_size: int = 32
    # Held out of the training set to choose hyperparameters on; 0 = no validation split.
    val_size: int = 0
    # Use only the first n (stratified, seeded) training / test images: 0 = all.
    train_subset: int = 0
    test_subset: int = 0
    download: bool = False
    # A corrupt or truncated image in an ImageFolder copy: `fail` (naming it) or `skip` it with a warning.
    bad_images: str = "fail"
    augment: bool = True
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    # synthetic only
    synthetic_train: int = 512
    synthetic_test: int = 256


@dataclass
class PhaseConfig:
    """One training phase (pretrain or fine-tune): optimizer and learning-rate schedule."""

    epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    batch_size: int = 128
    # Mixup alpha (OTOv2's recipe uses 0.2); 0 = off.
    mixup: float = 0.0


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # null = auto: 256 on CPU (larger CPU batches spend more time in page faults than in
    # convolutions), 1024 on CUDA.
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    deterministic: bool = False
    # The fast path: bf16 autocast and channels_last on unless set below (data stays on the
    # device and is augmented there on every device). null = auto: on for CUDA, and on a CPU with
    # native bf16 (dpm.train.resolve_speed probes it; metrics.json records fast_basis).
    fast: Optional[bool] = None
    bf16: Optional[bool] = None  # bf16 autocast (CUDA, or CPU with native bf16); null = as trainer.fast
    channels_last: Optional[bool] = None  # null = as trainer.fast
    # torch.compile the training forward (recompiled after each physical removal).
    compile: bool = False
    # Data-parallel training (DDP): processes per node x nodes, one per device; launch with
    # torchrun or srun (dpm/distributed.py). Batch sizes stay global.
    devices: int = 1
    nodes: int = 1
    progress: bool = True
    # A NaN/inf loss: `fail` stops the run naming the step (the last good checkpoint is kept);
    # `skip_step` skips such steps and counts them (costs one host sync a step).
    on_nan: str = "fail"
    # Cap on optimizer steps per epoch (0 = whole epoch): for smoke runs only.
    max_steps_per_epoch: int = 0
    # Checkpoints inside an epoch, for epochs longer than a job may run (ImageNet on a cluster with a
    # 10-minute limit or pre-emption): every this many optimizer steps and/or minutes; 0 = off (a
    # checkpoint after every epoch either way). Run-time keys: they never change results.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 5.0
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    # Sparse learning (DepGraph group_sl) between pretraining and pruning; weight decay 0 as the
    # regulariser replaces it. epochs 0 = off.
    sparse: PhaseConfig = field(default_factory=lambda: PhaseConfig(lr=0.01, weight_decay=0.0))
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(lr=0.01))


@dataclass
class PrunerConfig:
    """The base pruner (docs/method.md section 6): the keys every pruner has. Each pruner's own keys live in
    a subclass registered as `pruner/<name>_schema`, which its `conf/pruner/<name>.yaml` extends; a key
    of another pruner is then a composition error."""

    name: str = "none"
    # MACs speed-up target in the base method's native units (Torch-Pruning's counter for DepGraph).
    speedup: float = 2.0


@dataclass
class DepGraphConfig(PrunerConfig):
    """DepGraph (Torch-Pruning) with DPM in its selection rounds."""

    name: str = "depgraph"
    # R selection rounds; round r selects up to speedup ** (r / R) on the current weights.
    rounds: int = 1
    # Fine-tune iterations between round starts; 0 = one epoch. Equal for base / +SP / +SR.
    round_interval: int = 0
    # +SR with budget=base: rounds added after R while the target is not met.
    max_extra_rounds: int = 10
    # Torch-Pruning's progressive selection: steps of its pruning schedule, per-layer cap.
    iterative_steps: int = 400
    global_pruning: bool = True
    max_pruning_ratio: float = 1.0
    # Sparse learning before pruning (DepGraph's group_sl): GroupNormPruner regulariser strength;
    # the phase itself is trainer.sparse (epochs 0 = off).
    reg: float = 5e-4


@dataclass
class GateDecoratorConfig(PrunerConfig):
    """Gate Decorator (You et al. 2019): gated BN, Taylor scores, Tick-Tock, melt (issue 5).

    `speedup` (inherited) is not read: Gate Decorator stops on `flops_target` instead."""

    name: str = "gate_decorator"
    # Stop ticking once the native MACs (thop default rules) left are <= this fraction of the
    # unpruned model's, counting decaying channels as removed (VGG-16 recipe: 0.1).
    flops_target: float = 0.1
    # p: each tick masks this fraction of the channels still remaining (VGG-16 0.005, ResNet-56 0.002).
    prune_ratio: float = 0.005
    # Every layer (dependency group) keeps its max(1, int(ratio * C)) best-scored channels.
    min_channel_ratio: float = 0.1
    # How a tick counts and cuts: `original` (the original code: num = int(p * left BN-channel entries),
    # left read a tick late, every unit at or below the (num+1)-th lowest entry) or `units` (dpm's
    # earlier rule: the max(1, int(p * units left)) lowest units).
    tick_rule: str = "original"
    # The per-layer floor's rounding: `floor` (the original's int()) or `ceil` (dpm's earlier).
    floor_rounding: str = "floor"
    # BN biases train in ticks (the original; false: frozen, dpm's earlier ticks).
    tick_bn_bias: bool = True
    # One SGD momentum through ticks, tocks and drains (the original's single optimizer; false: a
    # fresh optimizer per phase, dpm's earlier ticks).
    carry_momentum: bool = True
    # The tick that would cross flops_target keeps only the shortest lowest-scored prefix of its
    # selection that reaches it (false: the whole selection, the original; with a coarse p that
    # lands up to a whole tick below the target, and base and +SP can land on either side of it).
    trim_to_target: bool = False
    # T: a tock after every T ticks.
    tock_every: int = 10
    # A tick: Taylor scores |g dL/dg| summed over its steps while everything but the convolutions
    # trains; weight decay 5e-4 as the original's one optimizer (dpm's earlier ticks: 0).
    tick: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(epochs=1, lr=1e-3, weight_decay=5e-4, schedule="constant")
    )
    # A tock: every weight trains (BN scales stay frozen at 1), L1 `tock_l1` on the gates, and a
    # per-step triangular lr tock.lr -> tock_lr_max -> tock.lr over the tock's epochs.
    tock: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(epochs=10, lr=1e-3, weight_decay=5e-4, schedule="constant")
    )
    tock_lr_max: float = 1e-2
    tock_l1: float = 1e-3
    # What +SP/+SR decay: `gate` (the gate alone) or `channel` (conv filter + gate + BN bias).
    decay_vector: str = "gate"
    # Safety stop: a run still above flops_target after this many ticks fails with a clear error.
    max_ticks: int = 2000
    # Evaluate on the test set after every tick (off: ticks are many and short).
    eval_ticks: bool = False


@dataclass
class OTOv2Config(PrunerConfig):
    """OTOv2's DHSPG on dependency groups (issue 6; docs/otov2-dhspg.md). Defaults are
    only_train_once 2.0.16's; None takes the variant default (sgd / adam / adamw)."""

    name: str = "otov2"
    variant: str = "sgd"  # sgd | adam | adamw
    lmbda: Optional[float] = None  # 1e-3 / 1e-2 / 1e-2
    lmbda_amplify: Optional[float] = None  # 2 / 20 / 20
    hat_lmbda_coeff: Optional[float] = None  # 10 / 1e3 / 1e3
    epsilon: float = 0.0
    # Coupled L2 (added to the gradient) for sgd and adam; decoupled only for adamw, the one variant
    # for which 2.0.16 reads weight_decay_type (l2_norm | l1_norm). 0 / 0 / 1e-2.
    weight_decay: Optional[float] = None
    weight_decay_type: str = "l2_norm"
    first_momentum: Optional[float] = None  # 0 / 0.9 / 0.9 (heavy ball for sgd)
    second_momentum: Optional[float] = None  # 0 / 0.999 / 0.999
    dampening: Optional[float] = None  # 0
    target_group_sparsity: float = 0.5
    tolerance_group_sparsity: float = 0.05
    # Partition and first projection step; start_pruning_epochs (epochs of pruner.train) wins if set.
    start_pruning_steps: int = 0
    start_pruning_epochs: Optional[float] = None
    # Used only if both are given (2.0.16); otherwise both equal the start of pruning.
    partition_step: Optional[int] = None
    half_space_project_steps: Optional[int] = None
    warm_up_steps: int = 0
    group_divisible: int = 1
    fixed_zero_groups: bool = True
    # The DHSPG training phase: epochs, lr, schedule, batch size, mixup. DHSPG takes its momentum and
    # weight decay from first_momentum / weight_decay above, so train.momentum and train.weight_decay
    # must stay 0 (validated). trainer.finetune runs on the pruned model afterwards if its epochs > 0.
    train: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            epochs=300,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.0,
            schedule="step",
            milestones=[75, 150, 225],
            gamma=0.1,
            batch_size=64,
            mixup=0.0,
        )
    )


@dataclass
class DPMConfig:
    """Decay Pruning Method settings (docs/method.md sections 3-4); used once a base pruner exists."""

    variant: str = "base"  # base | sp | sr
    # Decay length: N optimizer iterations when set (it wins), else N_epochs epochs of the phase the
    # decay runs in (dpm=sp|sr default 0.5: it fits every phase of every experiment, where a count of
    # iterations fits some and not others). dpm=base always runs with N = 1 (the base pruner alone),
    # whatever an experiment sets here, so one experiment file serves all three variants.
    N: Optional[int] = None
    N_epochs: Optional[float] = None
    interval: int = 1
    schedule: str = "linear"  # linear | cosine | exp
    c_rate_form: str = "radial"  # radial | relative | per_step
    T_rate: float = float("inf")
    T_len: float = float("inf")
    release_rule: str = "and"  # and | or
    # Rounds a released channel stays out of selection (1 = the rest of its round).
    release_cooldown: int = 1
    budget: str = "base"  # base | strict
    include_consumers: bool = False
    # Norm trajectories logged in dpm_log.json: the first `track` targets admitted, or null for every
    # one (to see released targets; the first few admitted rarely are). Logging only: a run-time key.
    track: Optional[int] = 8


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "dpm"
    entity: Optional[str] = None
    mode: str = "online"  # online | offline | disabled
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # Per-step training metrics (loss, lr, DPM counters) every this many optimizer steps; 0: per-epoch only.
    log_every: int = 50


@dataclass
class PretrainConfig:
    """Where the pretrained baseline comes from."""

    # A state_dict or run checkpoint to start from instead of pretraining.
    checkpoint: Optional[str] = None
    # Pretrained baselines are shared between runs with the same (model, dataset, seed, recipe).
    cache: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    dpm: DPMConfig = field(default_factory=DPMConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    name: str = "default"
    seed: int = 0
    # Output tree and shared cache; both relative to the directory the command runs in.
    output_root: str = "outputs"
    cache_dir: str = ".cache/dpm"
    run_id: str = MISSING
    # true: continue the newest unfinished run of the same name and config if this run dir has none.
    resume: bool = False
    # Continue a run dir whose saved config differs (beyond run-time keys) from this one.
    force_resume: bool = False
    # Re-estimate BatchNorm statistics on a few training batches before each stage-boundary eval.
    recalibrate_bn: bool = False
    # Free-form tags copied into metrics.json (e.g. which paper table a run belongs to).
    table: Optional[str] = None
    # The ablation a run belongs to (e.g. "N", "T_rate"); tagged `ablation` on W&B, copied to metrics.json.
    ablation: Optional[str] = None


def register_configs() -> None:
    """Register the schema under the name `schema` (used first in conf/config.yaml's defaults)."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, schema in PRUNER_SCHEMAS.items():
        store.store(group="pruner", name=f"{name}_schema", node=schema)


PRUNER_SCHEMAS = {
    "none": PrunerConfig,
    "depgraph": DepGraphConfig,
    "gate_decorator": GateDecoratorConfig,
    "otov2": OTOv2Config,
}
PRUNER_NAMES = tuple(PRUNER_SCHEMAS)

register_configs()

VARIANTS = ("base", "sp", "sr")
# ImageNet roots may be subsets (e.g. Imagenette): their class count is checked against the folders.
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def validate(cfg) -> None:
    """Semantic checks before any work starts; raises UserError naming the key, the value and the fix."""

    def fail(key: str, value, fix: str) -> None:
        raise UserError(f"{key}={value!r}: {fix}")

    if cfg.model.name not in MODEL_NAMES:
        fail("model.name", cfg.model.name, f"unknown model; valid: {', '.join(MODEL_NAMES)}")
    if cfg.model.shortcut not in (None, "projection", "zeropad"):
        fail("model.shortcut", cfg.model.shortcut, "use projection or zeropad")
    if cfg.model.classifier not in (None, "mlp", "linear"):
        fail("model.classifier", cfg.model.classifier, "use mlp or linear")
    if cfg.dataset.name not in DATASET_NAMES:
        fail("dataset.name", cfg.dataset.name, f"unknown dataset; valid: {', '.join(DATASET_NAMES)}")
    expected = DATASET_CLASSES.get(cfg.dataset.name)
    if expected is not None and cfg.dataset.num_classes != expected:
        fail("dataset.num_classes", cfg.dataset.num_classes, f"{cfg.dataset.name} has {expected} classes")
    if cfg.dataset.bad_images not in ("fail", "skip"):
        fail("dataset.bad_images", cfg.dataset.bad_images, "valid: fail, skip")
    for key in ("val_size", "train_subset", "test_subset"):
        if cfg.dataset[key] < 0:
            fail(f"dataset.{key}", cfg.dataset[key], "must be >= 0 (0 = none / all)")
    if cfg.pruner.name not in PRUNER_NAMES:
        fail("pruner.name", cfg.pruner.name, f"unknown pruner; valid: {', '.join(PRUNER_NAMES)}")
    if cfg.dpm.variant not in VARIANTS:
        fail("dpm.variant", cfg.dpm.variant, f"valid: {', '.join(VARIANTS)}")
    if cfg.dpm.variant != "base" and cfg.pruner.name == "none":
        fail(
            "dpm.variant",
            cfg.dpm.variant,
            "smooth pruning needs a base pruner: add pruner=depgraph, gate_decorator or otov2",
        )
    if cfg.dpm.N is not None and cfg.dpm.N < 1:
        fail("dpm.N", cfg.dpm.N, "N counts decay steps and must be >= 1 (N = 1 is the base method)")
    if cfg.dpm.N_epochs is not None and not cfg.dpm.N_epochs > 0:
        fail("dpm.N_epochs", cfg.dpm.N_epochs, "must be > 0 (or null to use dpm.N)")
    if cfg.dpm.variant != "base" and cfg.dpm.N is None and cfg.dpm.N_epochs is None:
        fail("dpm.N", None, "give the decay length: dpm.N (iterations) or dpm.N_epochs (epochs of its phase)")
    # What dpm.core defines decides what is legal (one list, the core's): the schedules by name,
    # the Self-Rectifying settings by RectifyConfig's own checks, one key at a time to name it.
    if cfg.dpm.schedule not in SCHEDULES:
        fail("dpm.schedule", cfg.dpm.schedule, f"valid: {', '.join(SCHEDULES)}")
    for key, name in RECTIFY_FIELDS.items():
        try:
            RectifyConfig(**{name: cfg.dpm[key]})
        except (ValueError, TypeError) as err:
            fail(f"dpm.{key}", cfg.dpm[key], str(err).removeprefix("RectifyConfig."))
    if cfg.dpm.track is not None and cfg.dpm.track < 0:
        fail("dpm.track", cfg.dpm.track, "must be >= 0 (targets whose norm trajectory is logged) or null for all")
    if cfg.pruner.name != "none":
        if not cfg.pruner.speedup > 1:
            fail("pruner.speedup", cfg.pruner.speedup, "the MACs speed-up target must be > 1")
    stage_for(cfg.pruner.name).validate_config(cfg, fail)  # the base pruner's own keys (dpm.stages)
    if cfg.dpm.interval < 1:
        fail("dpm.interval", cfg.dpm.interval, "must be >= 1")
    for phase in ("pretrain", "sparse", "finetune"):
        p = cfg.trainer[phase]
        if p.epochs < 0:
            fail(f"trainer.{phase}.epochs", p.epochs, "must be >= 0")
        if not p.lr > 0:
            fail(f"trainer.{phase}.lr", p.lr, "must be > 0")
        if p.batch_size < 1:
            fail(f"trainer.{phase}.batch_size", p.batch_size, "must be >= 1")
        if p.schedule not in ("cosine", "step", "constant"):
            fail(f"trainer.{phase}.schedule", p.schedule, "valid: cosine, step, constant")
        if p.mixup < 0:
            fail(f"trainer.{phase}.mixup", p.mixup, "the mixup alpha must be >= 0 (0 = off)")
        if list(p.milestones) != sorted(p.milestones):
            fail(f"trainer.{phase}.milestones", list(p.milestones), "must be increasing")
    if cfg.trainer.on_nan not in ("fail", "skip_step"):
        fail("trainer.on_nan", cfg.trainer.on_nan, "valid: fail, skip_step")
    t = cfg.trainer
    if t.devices < 1 or t.nodes < 1:
        fail("trainer.devices" if t.devices < 1 else "trainer.nodes", min(t.devices, t.nodes), "must be >= 1")
    world = t.devices * t.nodes
    if world > 1:
        if cfg.pruner.name in ("gate_decorator", "otov2"):
            fail(
                "trainer.devices",
                t.devices,
                f"pruner={cfg.pruner.name} is not supported with trainer.devices > 1 "
                f"yet: use pruner=depgraph or one device",
            )
        for phase in ("pretrain", "sparse", "finetune"):
            if t[phase].epochs and t[phase].batch_size % world:
                fail(
                    f"trainer.{phase}.batch_size",
                    t[phase].batch_size,
                    f"the global batch must divide evenly over the {world} processes",
                )
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        fail("trainer.eval_batch_size", t.eval_batch_size, "must be >= 1 (or null = auto)")
    for key in ("checkpoint_every_steps", "checkpoint_every_minutes"):
        if cfg.trainer[key] < 0:
            fail(f"trainer.{key}", cfg.trainer[key], "must be >= 0 (0 = only after every epoch)")
    if cfg.trainer.max_steps_per_epoch < 0:
        fail("trainer.max_steps_per_epoch", cfg.trainer.max_steps_per_epoch, "must be >= 0 (0 = whole epoch)")
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        fail("logger.mode", cfg.logger.mode, "valid: online, offline, disabled")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m dpm <overrides>` would run (without Hydra's own node)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# Keys that may change between a run and its resumption without changing its result.
RUNTIME_KEYS = (
    "run_id",
    "resume",
    "force_resume",
    "trainer.device",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.eval_batch_size",
    "trainer.compile",
    "trainer.checkpoint_every_steps",
    "trainer.checkpoint_every_minutes",
    "logger",
    "output_root",
    "cache_dir",
    "dataset.root",
    "dpm.track",
)


def comparable_config(container: dict) -> dict:
    """The config without run-time keys: equal for a run and its resumption."""
    out = copy.deepcopy(container)
    for key in RUNTIME_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out
