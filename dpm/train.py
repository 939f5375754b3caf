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

from dpm import distributed, faults
from dpm.errors import UserError
from dpm.phase import CheckpointPolicy, EpochMeter, NanPolicy, PhaseState

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


def onednn_conv_safe() -> bool:
    """Turn oneDNN's convolutions off on a CPU whose best kernels are AVX2 (no AVX-512); returns
    whether they stay on.

    There, torch 2.14.1's oneDNN runs 1x1 convolutions' weight gradient in its AVX2 1x1 kernel, which
    writes past the end of the gradient for pruned channel counts (valgrind over a DepGraph ResNet-20
    run: jit_avx2_1x1_convolution_bwd_weights_t, up to 16 bytes after a 5,248-byte block); glibc then
    aborts with "double free or corruption" or the process segfaults, at a later step than the
    write. torch's own convolution kernels are slower there, and correct."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()  # torch >= 2.1
    if capability == "AVX2" and torch.backends.mkldnn.enabled:
        torch.backends.mkldnn.enabled = False
        log.warning("oneDNN convolutions off on this AVX2 CPU: its 1x1 weight-gradient kernel overflows (dpm.train)")
    return bool(torch.backends.mkldnn.enabled)


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
    mixup = float(getattr(phase_cfg, "mixup", 0.0) or 0.0)
    nan = NanPolicy(on_nan, phase, phase_cfg, device)
    fault_hook = faults.installed()  # None in every real run: only the fault-injection tests install one
    hooks = list(hooks)
    # Per-step logging reads the loss (a host sync) only on logged steps; 0 turns it off.
    log_every = int(getattr(log_metrics, "log_every", 0) or 0) if log_metrics is not None else 0
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    state = PhaseState.start(
        model,
        phase,
        phase_cfg,
        hooks,
        checkpoint_path,
        bf16,
        optimizer_factory or make_optimizer,
        scheduler_factory or make_scheduler,
    )
    optimizer = state.optimizer
    ckpt = CheckpointPolicy(checkpoint_path, checkpoint_every_steps, checkpoint_every_minutes)
    forward = distributed.TrainModule(model, compile=compile)
    main = distributed.is_main()
    progress = progress and main
    model.train()
    for epoch in range(state.start_epoch, phase_cfg.epochs):
        first_step = state.start_step if epoch == state.start_epoch else 0
        meter = EpochMeter(device, state.partial if first_step else None)
        train_loader.set_epoch(epoch, first_step)
        lr = optimizer.param_groups[0]["lr"]
        nan.start_epoch()
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
            if fault_hook is not None:
                loss = fault_hook.step(phase, phase_step, loss)  # tests: a kill mid-epoch, a loss gone bad
            optimizer.zero_grad(set_to_none=True)
            if nan.skip_step(loss, step, phase_step, epoch):
                state.skipped_steps += 1
                continue
            loss.backward()
            for hook in hooks:
                getattr(hook, "before_step", _noop)(optimizer)
            optimizer.step()
            for hook in hooks:
                getattr(hook, "after_step", _noop)(optimizer)
            meter.add(loss, out, y)
            if log_every > 0 and main:
                if phase_step % log_every == 0:
                    log_metrics(_step_record(phase, phase_step, loss, lr, hooks))
            if progress and step % 20 == 0:  # one host sync per 20 steps, only for the bar
                bar.set_postfix(loss=f"{meter.loss():.3f}", acc=f"{meter.top1():.1f}", lr=f"{lr:.4g}")
            if ckpt.due_inside(step + 1, steps_per_epoch):
                nan.check(epoch)  # never a checkpoint of a state that went bad
                ranks = meter.rank_sums()
                if main:
                    ckpt.save(
                        phase,
                        model,
                        hooks,
                        state,
                        bf16,
                        epoch,
                        step + 1,
                        {"ranks": ranks, "elapsed_s": time.time() - meter.t0},
                    )
                distributed.barrier()
                ckpt.saved()
        nan.check(epoch)
        nan.check_parameters(model, epoch)
        state.scheduler.step()
        meter.reduce(model, device)
        train_loss = meter.loss()
        record = {"phase": phase, "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_top1": meter.top1()}
        for split, loader in eval_loaders.items():
            record[f"{split}_top1"], record[f"{split}_loss"] = evaluate(model, loader, device, bf16)
        record["epoch_time_s"] = time.time() - meter.t0
        state.history.append(record)
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
            ckpt.save(phase, model, hooks, state, bf16, epoch + 1)
            faults.fault_point(f"{phase}:epoch{epoch + 1}")
        if checkpoint_path is not None:
            distributed.barrier()  # no rank runs ahead of the checkpoint rank 0 is writing
            ckpt.saved()
    return summarize_phase(state.history, list(eval_loaders), state.skipped_steps)


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mixup (Zhang et al. 2018) as OTOv2's recipe uses it: one Beta(alpha, alpha) weight per batch,
    a random pairing. Returns the mixed inputs, both label sets with the dominant one first, and its weight."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y), device=x.device)
    mixed = lam * x + (1 - lam) * x[perm]
    if lam >= 0.5:
        return mixed, y, y[perm], lam
    return mixed, y[perm], y, 1 - lam


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
