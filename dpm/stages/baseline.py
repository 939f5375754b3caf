"""Stage 1, the pretrained baseline: a given checkpoint, the shared cache (one baseline for base,
+SP and +SR of a seed, trained once under a lock) or trained in the run dir."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dpm import distributed
from dpm.checkpoint import StageCache
from dpm.stages.base import load_weights
from dpm.train import resolve_device, resolve_speed

log = logging.getLogger(__name__)

#: The pretrain phase's own checkpoint when it is not cached (a resumable run dir).
PRETRAIN_PROGRESS = "pretrain_last.pt"


def pretrain_key_fields(cfg: DictConfig) -> dict:
    """What determines a pretrained baseline: model, data, seed and the pretrain recipe (not where
    the files live or which device runs it)."""
    d = cfg.dataset
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": {
            k: OmegaConf.to_container(d, resolve=True)[k]
            for k in (
                "name",
                "num_classes",
                "in_channels",
                "image_size",
                "val_size",
                "train_subset",
                "augment",
                "mean",
                "std",
                "synthetic_train",
                "synthetic_test",
                "bad_images",
            )
        },
        "seed": cfg.seed,
        "recipe": OmegaConf.to_container(cfg.trainer.pretrain, resolve=True),
        "max_steps_per_epoch": cfg.trainer.max_steps_per_epoch,
        "bf16": resolved_bf16(cfg),
        "channels_last": resolved_channels_last(cfg),
    }  # fp32 NCHW and the fast path never share a baseline


def resolved_bf16(cfg: DictConfig) -> bool:
    """trainer.bf16 as the run resolves it (null follows trainer.fast and the device)."""
    if cfg.trainer.bf16 is not None:
        return bool(cfg.trainer.bf16)
    return resolve_speed(cfg.trainer, resolve_device(cfg.trainer.device)).bf16


def resolved_channels_last(cfg: DictConfig) -> bool:
    """trainer.channels_last as the run resolves it (null follows trainer.fast and the device)."""
    return resolve_speed(cfg.trainer, resolve_device(cfg.trainer.device)).channels_last


def pretrained_baseline(cfg: DictConfig, model: torch.nn.Module, run_dir: Path, run_phase) -> dict:
    """Stage 1. Returns metrics about where the weights came from, and the pretrain phase summary."""
    pcfg = cfg.pretrain
    if pcfg.checkpoint:
        load_weights(model, pcfg.checkpoint, "pretrain.checkpoint")
        log.info("pretrained weights from %s", pcfg.checkpoint)
        return {
            "pretrain_source": "checkpoint",
            "pretrain_checkpoint": pcfg.checkpoint,
            "pretrain_epochs": 0,
            "pretrain_summary": {"epochs": 0, "history": []},
        }
    if cfg.trainer.pretrain.epochs == 0:
        return {"pretrain_source": "scratch", "pretrain_epochs": 0, "pretrain_summary": {"epochs": 0, "history": []}}
    if not pcfg.cache:
        summary = run_phase("pretrain", run_dir / PRETRAIN_PROGRESS)
        return {"pretrain_source": "trained", "pretrain_epochs": summary["epochs"], "pretrain_summary": summary}
    cache = StageCache(cfg.cache_dir, pretrain_key_fields(cfg))
    source, summary = cached_phase(cache, "pretrain", model, lambda path: run_phase("pretrain", path))
    return {
        "pretrain_source": source,
        "pretrain_key": cache.key,
        "pretrain_checkpoint": str(cache.model_path),
        "pretrain_epochs": summary["epochs"],
        "pretrain_summary": summary,
        "pretrain_top1": summary.get("test_top1_final"),
    }


def cached_phase(cache: StageCache, phase: str, model: torch.nn.Module, train) -> tuple[str, dict]:
    """Load the phase's result from the shared cache, or train it (under the key's lock) and publish it.
    Under DDP rank 0 holds the lock, decides, and alone publishes; the other ranks follow it."""
    main = distributed.is_main()
    with cache.lock() if main else contextlib.nullcontext():
        entry = cache.load() if main else None
        if distributed.broadcast_object(entry is not None) and entry is None:
            entry = cache.load()  # published by rank 0 under its lock
        if entry is not None:
            model.load_state_dict(entry["model"])
            log.info("reusing the cached %s result %s (%s)", phase, cache.key, cache.model_path)
            source, summary = "cache", entry["summary"]
        else:
            summary = train(cache.progress_path)
            if main:
                cache.publish({"model": model.state_dict(), "summary": summary, "key": cache.key_fields})
                log.info("%s result cached as %s", phase, cache.model_path)
            source = "trained"
    summary["phase"] = phase
    return source, summary
