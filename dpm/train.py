"""The training and evaluation loop: one phase (pretrain or fine-tune) at a time.

A phase checkpoints after every epoch (model, optimizer, scheduler, hooks, RNG states, history) and
continues from such a checkpoint to the same result as an uninterrupted run: the data order and
augmentation of an epoch depend only on (seed, phase, epoch), and the global RNG state is restored.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dpm import distributed
from dpm.checkpoint import atomic_torch_save, checkpoint_exists, load_checkpoint, rng_state, set_rng_state
from dpm.errors import UserError
from dpm.faults import fault_point, fault_step
from dpm.models import is_channels_last

log = logging.getLogger(__name__)


class StepHook(Protocol):
    """What a phase calls around each optimizer step (the DPM controller and base pruners plug in
    here). Every method is optional; `state_dict`/`load_state_dict` go into the checkpoint.

    step_start: before the forward pass (a pruner may admit or remove structures here).
    before_step: after backward, before optimizer.step() (gradients are the raw loss gradients).
    after_step: after optimizer.step().
    """

    def step_start(self, optimizer: torch.optim.Optimizer) -> None: ...
    def before_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def after_step(self, optimizer: torch.optim.Optimizer) -> None: ...


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is visible: use trainer.device=auto or cpu")
    return device


@dataclass(frozen=True)
class Speed:
    """The speed settings a run resolves from `trainer` for its device (dpm.config.TrainerConfig).

    `basis` says why `fast` is what it is (recorded in metrics.json as `fast_basis`)."""

    fast: bool
    bf16: bool
    channels_last: bool
    compile: bool
    eval_batch_size: int
    basis: str = ""


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), and how that was found out.

    torch's CPU capability report answers directly; only a torch without it falls back to a one-off
    timing probe (a small conv, fp32 against bf16 autocast): emulated bf16 is slower than fp32."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None and amx is not None:
        has_avx, has_amx = bool(avx512_bf16()), bool(amx())
        found = [name for name, ok in (("avx512_bf16", has_avx), ("amx", has_amx)) if ok]
        return bool(found), "cpu capability: " + (", ".join(found) if found else "no avx512_bf16 or amx")
    fp32_s, bf16_s = _conv_timing(False), _conv_timing(True)
    return bf16_s < 0.8 * fp32_s, f"timing probe: bf16 {bf16_s * 1e3:.1f} ms vs fp32 {fp32_s * 1e3:.1f} ms"


def _conv_timing(bf16: bool) -> float:
    """Best of 3 of a ResNet-sized conv forward + backward (a few milliseconds)."""
    conv = nn.Conv2d(32, 32, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(32, 32, 16, 16).to(memory_format=torch.channels_last)
    best = float("inf")
    for _ in range(4):  # the first is warm-up (oneDNN builds its kernels)
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), bf16):
            conv(x).float().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def resolve_speed(tcfg: Any, device: torch.device) -> Speed:
    """`trainer.fast` null = on for CUDA, and on a CPU that computes bf16 natively (cpu_bf16_native);
    bf16 autocast and channels_last follow it unless set (explicit values win); the eval batch is
    1024 on CUDA and 256 on CPU unless set. On a CPU without native bf16, autocast would emulate it
    (slower than fp32) and channels_last alone gains less, so the plain fp32 NCHW loop stays."""

    def get(key: str, default: Any = None) -> Any:
        return getattr(tcfg, key, default) if not isinstance(tcfg, dict) else tcfg.get(key, default)

    cuda = device.type == "cuda"
    if get("fast") is not None:
        fast, basis = bool(get("fast")), f"trainer.fast={bool(get('fast'))}"
    elif cuda:
        fast, basis = True, "cuda"
    elif device.type == "cpu":
        fast, basis = cpu_bf16_native()
    else:
        fast, basis = False, f"no fast path on {device.type}"
    bf16 = fast if get("bf16") is None else bool(get("bf16"))
    channels_last = fast if get("channels_last") is None else bool(get("channels_last"))
    eval_batch = get("eval_batch_size") or (1024 if cuda else 256)
    return Speed(fast, bf16, channels_last, bool(get("compile", False)), int(eval_batch), basis)


def make_optimizer(model: nn.Module, phase_cfg: Any) -> torch.optim.Optimizer:
    """SGD with momentum and (coupled) weight decay, as every base recipe uses."""
    return torch.optim.SGD(
        model.parameters(),
        lr=phase_cfg.lr,
        momentum=phase_cfg.momentum,
        nesterov=phase_cfg.nesterov and phase_cfg.momentum > 0,
        weight_decay=phase_cfg.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, phase_cfg: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: `step` (MultiStepLR at `milestones`), `cosine` (to 0 over the phase) or `constant`."""
    if phase_cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(phase_cfg.milestones), phase_cfg.gamma)
    if phase_cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase_cfg.epochs, 1))
    if phase_cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise UserError(f"unknown schedule '{phase_cfg.schedule}'; valid: step, cosine, constant")


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA or CPU when `bf16`, else a null context. Only the forward runs under
    it: parameters, gradients, the optimizer, BatchNorm running statistics and the loss (computed on
    `out.float()`) stay fp32, and so does every DPM computation (hooks run outside it)."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, bf16: bool = False) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy over a loader, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    n = 0
    for x, y in loader:
        with autocast(device, bf16):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    model.train(was_training)
    if distributed.is_initialized():  # each rank evaluated its share of the split
        seen = torch.tensor(float(n), device=device)
        distributed.all_reduce_sum(correct, loss_sum, seen)
        n = int(seen.item())
    return 100.0 * correct.item() / max(n, 1), loss_sum.item() / max(n, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50) -> None:
    """Re-estimate BatchNorm running statistics on training batches (cumulative average).

    Pruning leaves the running statistics of shrunk or regrown channels stale; evaluating without
    this can read tens of points low (docs/method.md section 10)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    average_buffers(model)  # DDP: each rank saw its own batches
    model.train(was_training)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Under DDP, make BatchNorm running statistics equal on every rank (their mean); a no-op otherwise."""
    if not distributed.is_initialized():
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            tdist.all_reduce(buf)
            buf.div_(distributed.world_size())


def train_phase(
    model: nn.Module,
    phase: str,
    phase_cfg: Any,
    train_loader: Any,
    eval_loaders: dict[str, Any],
    device: torch.device,
    checkpoint_path: str | Path | None = None,
    hooks: Iterable[Any] = (),
    progress: bool = True,
    bf16: bool = False,
    log_metrics: Callable[[dict], None] | None = None,
    optimizer_factory: Callable[[nn.Module, Any], torch.optim.Optimizer] = None,
    scheduler_factory: Callable[[torch.optim.Optimizer, Any], Any] = None,
    on_nan: str = "fail",
    compile: bool = False,
    checkpoint_every_steps: int = 0,
    checkpoint_every_minutes: float = 0.0,
) -> dict:
    """Train `model` for `phase_cfg.epochs` epochs with SGD and the phase's schedule.

    Evaluates every loader in `eval_loaders` (e.g. {"test": ..., "val": ...}) after each epoch and
    checkpoints to `checkpoint_path` (resuming from it when it holds this phase). Returns the phase
    summary: history (one dict an epoch), final/best top-1 per split and the best epoch.

    `log_metrics` gets one record per epoch (`<phase>/<key>`, plus `<phase>/step`) and, when it has
    a positive `log_every` attribute (the W&B logger), one per-step record every `log_every`
    optimizer steps: `<phase>/loss`, `<phase>/lr`, `<phase>/step` and the DPM counters of any hook
    with a `controller` (`<phase>/dpm_decaying`, `_pruned`, `_released`, `_releases_total`).

    `optimizer_factory(model, phase_cfg)` and `scheduler_factory(optimizer, phase_cfg)` replace the
    default SGD and per-epoch schedule (a base pruner's own optimizer, e.g. OTOv2's DHSPG); they are
    called again on resume. A scheduler's `step()` runs once per epoch. `phase_cfg.mixup` > 0 trains
    on mixup batches (Beta(alpha, alpha) weights; the train accuracy counts the dominant label).

    A non-finite loss or parameter stops the phase with a NumericalError naming the step, before the
    epoch's checkpoint is written, so the last good checkpoint stays the latest (`on_nan="fail"`;
    checked on the device, read every NAN_CHECK_EVERY steps). `on_nan="skip_step"` instead skips
    every step whose loss is not finite (one host sync a step) and counts them in the summary.

    Under a process group (dpm.distributed) the forward runs through DDP (rebuilt whenever a hook
    replaced parameters, e.g. a physical removal), the loader yields this rank's share, losses,
    accuracies and evaluations are summed over ranks, and only rank 0 writes the checkpoint.
    `compile=True` runs the forward through torch.compile.

    `checkpoint_every_steps` / `checkpoint_every_minutes` (0 = off) also checkpoint inside an epoch
    (after the step that makes one due; minutes are polled every CHECKPOINT_POLL steps), and a run
    resumed from such a checkpoint continues the epoch at the next step with its running sums: with
    an in-memory loader (SplitLoader) to the same result as an uninterrupted run.
    """
    optimizer_factory = optimizer_factory or make_optimizer
    scheduler_factory = scheduler_factory or make_scheduler
    mixup = float(getattr(phase_cfg, "mixup", 0.0) or 0.0)
    if on_nan not in ("fail", "skip_step"):
        raise UserError(f"trainer.on_nan={on_nan!r}: valid: fail, skip_step")
    nan_fault_step = fault_step(f"{phase}:nan_step")
    kill_fault_step = fault_step(f"{phase}:kill_step")
    skipped_steps = 0
    hooks = list(hooks)
    # Per-step logging reads the loss (a host sync) only on logged steps; 0 turns it off.
    log_every = int(getattr(log_metrics, "log_every", 0) or 0) if log_metrics is not None else 0
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    optimizer = optimizer_factory(model, phase_cfg)
    scheduler = scheduler_factory(optimizer, phase_cfg)
    history: list[dict] = []
    start_epoch, start_step, partial = 0, 0, None
    if checkpoint_path is not None and checkpoint_exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path)
        if state.get("phase") == phase:
            _refuse_other_numerics(state, checkpoint_path, bf16, model)
            # Hooks first: a pruner replays its removals so the pruned weights fit the model; the
            # optimizer is then rebuilt over the (possibly smaller) parameters before its state loads.
            for hook, hook_state in zip(hooks, state.get("hooks", [])):
                if hook_state is not None:
                    hook.load_state_dict(hook_state)
            model.load_state_dict(state["model"])
            optimizer = optimizer_factory(model, phase_cfg)
            optimizer.load_state_dict(state["optimizer"])
            scheduler = scheduler_factory(optimizer, phase_cfg)
            scheduler.load_state_dict(state["scheduler"])
            history = state["history"]
            start_epoch = state["epoch"]
            skipped_steps = state.get("skipped_steps", 0)
            start_step, partial = state.get("step", 0), state.get("partial")
            set_rng_state(state["rng"])
            if start_step:
                log.info(
                    "%s: resuming at step %d of epoch %d from %s", phase, start_step, start_epoch + 1, checkpoint_path
                )
            else:
                log.info("%s: resuming after epoch %d from %s", phase, start_epoch, checkpoint_path)

    def save(epoch_done: int, step_done: int = 0, sums: dict | None = None) -> None:
        """The phase's checkpoint: after `epoch_done` epochs and `step_done` steps of the next one."""
        atomic_torch_save(
            {
                "phase": phase,
                "epoch": epoch_done,
                "step": step_done,
                "partial": sums,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
                "history": history,
                "rng": rng_state(),
                "skipped_steps": skipped_steps,
                "numerics": _numerics(bf16, model),
            },
            checkpoint_path,
        )

    forward = distributed.TrainModule(model, compile=compile)
    main = distributed.is_main()
    progress = progress and main
    model.train()
    mid_epoch = checkpoint_path is not None and (checkpoint_every_steps > 0 or checkpoint_every_minutes > 0)
    last_save = time.time()
    for epoch in range(start_epoch, phase_cfg.epochs):
        t0 = time.time()
        first_step = start_step if epoch == start_epoch else 0
        train_loader.set_epoch(epoch, first_step)
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        if first_step and partial:  # this rank's running sums of the steps before the checkpoint
            mine = _rank_partial(partial["ranks"])
            loss_sum += mine["loss_sum"]
            correct += mine["correct"]
            seen = mine["seen"]
            t0 -= partial["elapsed_s"]
        first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)  # step index, -1 = none
        bar = _progress(train_loader, progress, f"{phase} {epoch + 1}/{phase_cfg.epochs}")
        for step, (x, y) in enumerate(bar, start=first_step):
            for hook in hooks:
                getattr(hook, "step_start", _noop)(optimizer)
            if mixup > 0:
                x, y, y_mix, lam = mixup_batch(x, y, mixup)
            with autocast(device, bf16):
                out = forward(x)
                loss = F.cross_entropy(out.float(), y)
                if mixup > 0:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(out.float(), y_mix)
            phase_step = (epoch * steps_per_epoch if steps_per_epoch is not None else 0) + step
            if kill_fault_step == phase_step:
                fault_point(f"{phase}:kill_step{phase_step}")  # tests: a kill mid-epoch (e.g. mid-decay)
            if nan_fault_step is not None and phase_step == nan_fault_step:
                loss = loss * float("nan")  # fault injection (tests): a loss that went bad
            optimizer.zero_grad(set_to_none=True)
            if on_nan == "skip_step":
                finite = torch.isfinite(loss.detach()).float()
                if distributed.is_initialized():  # every rank skips together, or DDP would hang
                    tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
                if not bool(finite):  # the host sync this policy costs
                    skipped_steps += 1
                    log.warning(
                        "%s step %d: loss %s, step skipped (trainer.on_nan=skip_step)", phase, phase_step, loss.item()
                    )
                    continue
            else:
                first_nonfinite = torch.where(
                    (first_nonfinite < 0) & ~torch.isfinite(loss.detach()),
                    torch.full_like(first_nonfinite, phase_step),
                    first_nonfinite,
                )
                if step % NAN_CHECK_EVERY == NAN_CHECK_EVERY - 1:
                    distributed.all_reduce_max(first_nonfinite)
                    _raise_if_nonfinite(first_nonfinite, phase, epoch, phase_cfg)
            loss.backward()
            for hook in hooks:
                getattr(hook, "before_step", _noop)(optimizer)
            optimizer.step()
            for hook in hooks:
                getattr(hook, "after_step", _noop)(optimizer)
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            if log_every > 0 and main:
                if phase_step % log_every == 0:
                    log_metrics(_step_record(phase, phase_step, loss, lr, hooks))
            if progress and step % 20 == 0:  # one host sync per 20 steps, only for the bar
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}", lr=f"{lr:.4g}"
                )
            if (
                mid_epoch
                and (steps_per_epoch is None or step + 1 < steps_per_epoch)
                and _checkpoint_due(step + 1, last_save, checkpoint_every_steps, checkpoint_every_minutes)
            ):
                # Never a checkpoint of a state that went bad: the NaN check runs first.
                distributed.all_reduce_max(first_nonfinite)
                _raise_if_nonfinite(first_nonfinite, phase, epoch, phase_cfg)
                # Each rank's sums (they are summed over ranks only at the epoch's end).
                ranks = distributed.gather_object({"loss_sum": float(loss_sum), "correct": int(correct), "seen": seen})
                if main:
                    save(epoch, step + 1, {"ranks": ranks, "elapsed_s": time.time() - t0})
                distributed.barrier()
                last_save = time.time()
        distributed.all_reduce_max(first_nonfinite)
        _raise_if_nonfinite(first_nonfinite, phase, epoch, phase_cfg)
        bad = nonfinite_parameters(model)
        if bad:
            raise NumericalError(
                f"{phase}: parameter {bad[0]} is not finite after epoch {epoch + 1}; the last good "
                f"checkpoint is kept: lower trainer.{phase}.lr (now {phase_cfg.lr}) or check the data"
            )
        scheduler.step()
        if distributed.is_initialized():
            # One collective an epoch: the ranks' sums, and rank 0's BatchNorm statistics everywhere
            # (DDP broadcasts them before each forward; the last batch left each rank its own).
            seen_t = torch.tensor(float(seen), device=device)
            distributed.all_reduce_sum(loss_sum, correct, seen_t)
            seen = int(seen_t.item())
            sync_buffers(model)
        train_loss = loss_sum.item() / max(seen, 1)
        record = {
            "phase": phase,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "train_top1": 100.0 * correct.item() / max(seen, 1),
        }
        for split, loader in eval_loaders.items():
            record[f"{split}_top1"], record[f"{split}_loss"] = evaluate(model, loader, device, bf16)
        record["epoch_time_s"] = time.time() - t0
        history.append(record)
        log.info(
            "%s epoch %d/%d  loss %.4f  train %.2f%%  %s  lr %.4g  (%.1fs)",
            phase,
            epoch + 1,
            phase_cfg.epochs,
            train_loss,
            record["train_top1"],
            "  ".join(f"{s} {record[f'{s}_top1']:.2f}%" for s in eval_loaders),
            lr,
            record["epoch_time_s"],
        )
        if log_metrics is not None and main:
            epoch_record = {f"{phase}/{k}": v for k, v in record.items() if k != "phase"}
            if steps_per_epoch is not None:  # the stage's x-axis (see dpm.loggers)
                epoch_record[f"{phase}/step"] = (epoch + 1) * steps_per_epoch
            log_metrics(epoch_record)
        if checkpoint_path is not None and main:
            save(epoch + 1)
            fault_point(f"{phase}:epoch{epoch + 1}")
        if checkpoint_path is not None:
            distributed.barrier()  # no rank runs ahead of the checkpoint rank 0 is writing
            last_save = time.time()
    return summarize_phase(history, list(eval_loaders), skipped_steps)


def _numerics(bf16: bool, model: nn.Module) -> dict:
    """What decides a phase's arithmetic besides the config: bf16 autocast and the memory format."""
    return {"bf16": bool(bf16), "channels_last": is_channels_last(model)}


def _refuse_other_numerics(state: dict, path: str | Path, bf16: bool, model: nn.Module) -> None:
    """A phase continues only with the arithmetic it started with: resuming an fp32 NCHW checkpoint
    on the fast path (or back) would mix two numerics in one run. A checkpoint written before this
    was recorded carries no `numerics` and is taken as it is."""
    saved, now = state.get("numerics"), _numerics(bf16, model)
    if saved is None or saved == now:
        return
    raise UserError(
        f"{path} was trained with bf16={saved['bf16']}, channels_last={saved['channels_last']} but this "
        f"run resolves bf16={now['bf16']}, channels_last={now['channels_last']}: continue it with "
        f"trainer.bf16={str(saved['bf16']).lower()} trainer.channels_last="
        f"{str(saved['channels_last']).lower()}, or start it under another run_id"
    )


def _rank_partial(ranks: list[dict]) -> dict:
    """This rank's share of the running sums saved with a mid-epoch checkpoint. Resumed with another
    number of ranks, rank 0 takes all of them (the epoch's totals are unchanged) and the others none."""
    if len(ranks) == distributed.world_size():
        return ranks[distributed.rank()]
    if not distributed.is_main():
        return {"loss_sum": 0.0, "correct": 0, "seen": 0}
    return {key: sum(r[key] for r in ranks) for key in ("loss_sum", "correct", "seen")}


def _checkpoint_due(steps_done: int, last_save: float, every_steps: int, every_minutes: float) -> bool:
    """Whether a mid-epoch checkpoint is due after `steps_done` steps of the epoch. The clock is read
    every CHECKPOINT_POLL steps and, under DDP, rank 0's reading decides for every rank."""
    if every_steps > 0 and steps_done % every_steps == 0:
        return True
    if every_minutes <= 0 or steps_done % CHECKPOINT_POLL:
        return False
    return bool(distributed.broadcast_object(time.time() - last_save >= 60.0 * every_minutes))


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank."""
    for buf in model.buffers():
        tdist.broadcast(buf, 0)


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mixup (Zhang et al. 2018) as OTOv2's recipe uses it: one Beta(alpha, alpha) weight per batch,
    a random pairing. Returns the mixed inputs, both label sets with the dominant one first, and its weight."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y), device=x.device)
    mixed = lam * x + (1 - lam) * x[perm]
    if lam >= 0.5:
        return mixed, y, y[perm], lam
    return mixed, y[perm], y, 1 - lam


# Steps between reads of the on-device non-finite flag (one host sync each).
NAN_CHECK_EVERY = 50
# Steps between reads of the clock for trainer.checkpoint_every_minutes (a collective under DDP).
CHECKPOINT_POLL = 20


class NumericalError(UserError):
    """A NaN/inf loss or parameter: the run stops, its last good checkpoint stays the latest."""


def _raise_if_nonfinite(first_nonfinite: torch.Tensor, phase: str, epoch: int, phase_cfg: Any) -> None:
    step = int(first_nonfinite.item())
    if step >= 0:
        raise NumericalError(
            f"{phase}: the loss became NaN/inf at step {step} (epoch {epoch + 1}); the last good "
            f"checkpoint is kept: lower trainer.{phase}.lr (now {phase_cfg.lr}), check the data, "
            f"or set trainer.on_nan=skip_step"
        )


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or inf (one host sync when all are finite)."""
    params = [(n, p) for n, p in model.named_parameters()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return []
    return [n for n, p in params if not bool(torch.isfinite(p).all())]


def summarize_phase(history: list[dict], splits: list[str], skipped_steps: int = 0) -> dict:
    """Final and best top-1 per split over a phase's epochs (best epoch chosen per split)."""
    summary: dict[str, Any] = {"history": history, "epochs": len(history)}
    if skipped_steps:
        summary["skipped_steps"] = skipped_steps
    for split in splits:
        values = [r[f"{split}_top1"] for r in history]
        if values:
            best = max(range(len(values)), key=values.__getitem__)
            summary[f"{split}_top1_final"] = values[-1]
            summary[f"{split}_top1_best"] = values[best]
            summary[f"{split}_top1_best_epoch"] = best + 1
    return summary


def _step_record(phase: str, phase_step: int, loss: torch.Tensor, lr: float, hooks: list) -> dict:
    """One per-step logging record: the step's loss (one host sync), lr and the DPM counters."""
    record = {f"{phase}/step": phase_step, f"{phase}/loss": loss.detach().float().item(), f"{phase}/lr": lr}
    for hook in hooks:
        controller = getattr(hook, "controller", None)
        if controller is not None and hasattr(controller, "counts"):
            counts = controller.counts()  # host-side ints: no device sync
            for key in ("decaying", "pruned", "released", "releases_total"):
                if key in counts:
                    record[f"{phase}/dpm_{key}"] = counts[key]
    return record


def _noop(*_: Any) -> None:
    return None


def _progress(loader: Any, enabled: bool, desc: str):
    if not enabled:
        return loader
    # disable=None: no bar when stderr is not a terminal (CI logs, SLURM files).
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
