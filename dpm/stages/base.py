"""What every pruning stage shares: the run context the runner hands it, the stage contract, and
the config -> DPM pieces (decay length, Self-Rectifying settings, the decay log) all three bases use.

A stage module (dpm.stages.depgraph, .otov2, .gate_decorator) is the run-side glue of one base
pruner: ``validate_config(cfg, fail)`` checks its keys, ``preflight(ctx)`` checks what needs the
model and data but no training, ``run_stage(ctx)`` prunes between the pretrained baseline and the
final measurement. The algorithms themselves live in dpm.pruners and know nothing of this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from omegaconf import DictConfig

from dpm import data as dpm_data
from dpm.checkpoint import load_checkpoint
from dpm.core import RectifyConfig, resolve_decay_steps
from dpm.errors import UserError
from dpm.measure import count_macs_params, native_macs_params
from dpm.models import build_model
from dpm.train import evaluate, resolve_speed, train_phase

#: The run's main checkpoint: the phase that ends the stage (fine-tune, or OTOv2's DHSPG phase).
CHECKPOINT = "checkpoint.pt"

Fail = Callable[[str, Any, str], None]

#: dpm.<key> -> the RectifyConfig field it sets (dpm.config.validate checks each through it).
RECTIFY_FIELDS = {
    "T_rate": "t_rate",
    "T_len": "t_len",
    "c_rate_form": "c_rate_form",
    "release_rule": "release_rule",
    "release_cooldown": "release_cooldown",
    "budget": "budget",
}


class Stage(Protocol):
    """One base pruner's run-side glue (a module of dpm.stages)."""

    def validate_config(self, cfg: DictConfig, fail: Fail) -> None:
        """Check the base's own keys; ``fail(key, value, fix)`` raises the one-line UserError."""

    def preflight(self, ctx: "RunContext") -> None:
        """Refuse an infeasible plan before any training (the model and data are built)."""

    def run_stage(self, ctx: "RunContext") -> dict:
        """Prune ``ctx.model``; return the metrics, ``final_phase`` and ``stage_epochs``."""


def decay_steps(cfg: DictConfig, iters_per_epoch: int, iters_left: int | None = None) -> int:
    """The decay length N in optimizer steps: 1 for dpm=base, else ``dpm.N`` or ``dpm.N_epochs`` of
    the phase the decay runs in (``iters_left``: the steps that phase has left, when bounded)."""
    d = cfg.dpm
    if d.variant == "base":
        return 1
    try:
        return resolve_decay_steps(
            N=d.N,
            N_epochs=None if d.N is not None else d.N_epochs,
            iters_per_epoch=iters_per_epoch,
            iters_left=iters_left,
        )
    except ValueError as err:
        raise UserError(f"dpm.N: {err}") from None


@dataclass
class RunContext:
    """What a pruning stage gets from the runner (dpm.stages: `run_stage(ctx)`).

    `model` may be replaced by a stage (e.g. after a physical removal that builds a new module);
    `run_phase` always trains `ctx.model`. A stage calls `mark_before_prune()` once, at the point its
    base method would start pruning (after its own pre-pruning training, if any), and returns a dict
    with its metrics and `final_phase`: the summary of the last training phase it ran (or None).
    """

    cfg: DictConfig
    model: torch.nn.Module
    run_dir: Path
    device: torch.device
    example: torch.Tensor
    data: Any
    eval_loaders: dict
    log_metrics: Any
    metrics: dict = field(default_factory=dict)
    speed: Any = None  # dpm.train.Speed: bf16, channels_last, compile, eval batch for this device

    def phase_loader(self, phase: str, batch_size: int | None = None):
        """The training loader of a phase; its order and augmentation depend on (seed, phase, epoch) only."""
        t = self.cfg.trainer
        return dpm_data.train_loader(
            self.data,
            batch_size or t[phase].batch_size,
            self.device,
            self.cfg.seed,
            phase,
            t.max_steps_per_epoch,
            self._speed().channels_last,
            t.num_workers,
        )

    def _speed(self):
        if self.speed is None:
            self.speed = resolve_speed(self.cfg.trainer, self.device)
        return self.speed

    def run_phase(
        self,
        phase: str,
        checkpoint_path: Path | None,
        hooks=(),
        phase_cfg=None,
        loader=None,
        eval_loaders: dict | None = None,
        **train_kwargs,
    ) -> dict:
        """Train `ctx.model` for one phase (`trainer.<phase>` unless `phase_cfg` is given), checkpointed and
        resumable at `checkpoint_path` (evaluated on `eval_loaders`, default all of `ctx.eval_loaders`);
        extra keyword arguments go to `dpm.train.train_phase`."""
        t = self.cfg.trainer
        phase_cfg = phase_cfg if phase_cfg is not None else t[phase]
        loader = loader if loader is not None else self.phase_loader(phase, phase_cfg.batch_size)
        eval_loaders = self.eval_loaders if eval_loaders is None else eval_loaders
        return train_phase(
            self.model,
            phase,
            phase_cfg,
            loader,
            eval_loaders,
            self.device,
            checkpoint_path=checkpoint_path,
            hooks=hooks,
            progress=t.progress,
            bf16=self._speed().bf16,
            log_metrics=self.log_metrics,
            on_nan=t.on_nan,
            compile=self._speed().compile,
            checkpoint_every_steps=t.checkpoint_every_steps,
            checkpoint_every_minutes=t.checkpoint_every_minutes,
            **train_kwargs,
        )

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        return evaluate(self.model, self.eval_loaders[split], self.device, self._speed().bf16)

    def mark_before_prune(self) -> None:
        """Record the unpruned model's accuracy and counts (the base of every ratio in metrics.json)."""
        self.metrics["top1_before_prune"], _ = self.evaluate("test")
        self.metrics["_base_counts"] = count_macs_params(self.model, self.example)
        self.metrics["_native_base"] = native_macs_params(self.model, self.example, self.cfg.pruner.name)


def rectify_config(d: DictConfig):
    """The Self-Rectifying settings of a `dpm` config node: a RectifyConfig for +SR, None otherwise."""
    if d.variant != "sr":
        return None
    return RectifyConfig(**{name: d[key] for key, name in RECTIFY_FIELDS.items()})


def decay_log(controller) -> dict:
    """The controller's per-step log (counts, C_rate/C_len summaries, norm trajectories, releases)."""
    state = controller.log.state_dict()
    return json.loads(json.dumps(state, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def model_build_spec(cfg: DictConfig) -> dict:
    """``dpm.models.build_model(**spec)`` builds the configured network (plain values: a pruned
    model's file stores it to rebuild the network, see dpm.checkpoint.save_pruned_model)."""
    options = {k: cfg.model[k] for k in ("shortcut", "classifier") if cfg.model[k] is not None}
    return {
        "name": str(cfg.model.name),
        "num_classes": int(cfg.dataset.num_classes),
        "in_channels": int(cfg.dataset.in_channels),
        **options,
    }


def build_configured_model(cfg: DictConfig) -> torch.nn.Module:
    try:
        model = build_model(**model_build_spec(cfg))
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    if cfg.model.weights:
        load_weights(model, cfg.model.weights, "model.weights")
    return model


def load_weights(model: torch.nn.Module, path: str, key: str) -> None:
    """Load a state_dict (or a dpm checkpoint holding one under "model") and insist that it fits."""
    if not Path(path).is_file():
        raise UserError(f"{key}={path} does not exist: give the path of a saved state_dict")
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{key}={path} does not match the model ({first}): pick the checkpoint of this model and dataset"
        ) from None
