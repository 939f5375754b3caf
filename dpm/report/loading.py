"""Reading run dirs: metrics.json plus the config flattened into `cfg.*` columns, statuses, duplicates."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from dpm.config import comparable_config
from dpm.report.frame import COMPLETE, GROUP_KEYS, MISSING, REPORT_DIRNAME, RUNNING, runs_frame
from dpm.run_lock import lock_holder


class NoRunsError(ValueError):
    """The given dirs hold no run (no metrics.json and no dpm config.yaml)."""


def _is_dpm_config(cfg: Any) -> bool:
    # W&B writes its own files/config.yaml inside run dirs: only a dpm config has these groups.
    return isinstance(cfg, dict) and {"model", "dataset", "dpm"} <= set(cfg)


def _load_config(run_dir: Path) -> tuple[dict | None, str | None]:
    """The run's config: the runner's resolved `config.yaml`, else Hydra's `.hydra/config.yaml`."""

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                # resolve=False: Hydra's copy still holds ${now:...}/${oc.env:...}; the keys that use
                # them are run-time keys, dropped before configs are compared.
                cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # noqa: BLE001  (an unreadable config makes the run incomplete, not the report)
                continue
            if _is_dpm_config(cfg):
                return cfg, str(path)
    return None, None


def find_run_dirs(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every run dir under `dirs`: a folder with a metrics.json or a dpm config.yaml (beside it or in
    `.hydra/`). Report dirs and W&B's folders are skipped."""
    found: set[Path] = set()
    for root in map(Path, dirs):
        for path in root.rglob("*"):
            parts = set(path.relative_to(root).parts[:-1])
            if "wandb" in parts or REPORT_DIRNAME in parts:
                continue
            if path.name == "metrics.json":
                found.add(path.parent)
            elif path.name == "config.yaml":
                run_dir = path.parent.parent if path.parent.name == ".hydra" else path.parent
                if run_dir not in found and _load_config(run_dir)[0] is not None:
                    found.add(run_dir)
    return sorted(found)


def _flatten(tree: dict, prefix: str) -> dict:
    """Nested dicts -> dotted keys; lists become JSON strings so that columns stay hashable."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _dup_key(cfg: dict | None, metrics: dict) -> str:
    """Equal for runs that should have given the same result: the config without run-time keys (seed
    included), or, without a config, what metrics.json says the run was."""
    if cfg is not None:
        basis: Any = comparable_config(cfg)
    else:
        basis = {
            k: metrics.get(k)
            for k in (
                "name",
                "table",
                "model",
                "dataset",
                "pruner",
                "variant",
                "seed",
                "N",
                "T_rate",
                "T_len",
                "sparse_learning",
            )
        }
    return hashlib.sha1(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_run(run_dir: Path) -> dict:
    """One run dir -> one flat row (metrics fields, `cfg.*` config facets, bookkeeping)."""
    metrics_path = run_dir / "metrics.json"
    cfg, cfg_path = _load_config(run_dir)
    metrics: dict[str, Any] = {}
    problem = None
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            problem = f"unreadable metrics.json: {err}"
    row: dict[str, Any] = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    row.update(_flatten({k: v for k, v in metrics.items() if k == "epochs" and isinstance(v, dict)}, ""))
    if cfg is not None:
        row.update(_flatten(cfg, "cfg."))
        # A run that failed before writing metrics (or never got there) still says what it was.
        identity = {
            "name": cfg.get("name"),
            "table": cfg.get("table"),
            "model": cfg["model"].get("name"),
            "dataset": cfg["dataset"].get("name"),
            "pruner": (cfg.get("pruner") or {}).get("name"),
            "variant": cfg["dpm"].get("variant"),
            "seed": cfg.get("seed"),
        }
        for key, value in identity.items():
            row.setdefault(key, value)
        if "sparse_learning" not in row and isinstance(cfg.get("trainer"), dict):
            row["sparse_learning"] = (cfg["trainer"].get("sparse") or {}).get("epochs", 0) > 0
        row.update(_choice_facets(cfg, row))
    row["target"] = pruning_target(metrics, cfg or {})
    if not metrics_path.is_file():
        problem = "config.yaml but no metrics.json (killed, or never started)"
    status = metrics.get("status") if metrics else MISSING
    row["status"] = status or MISSING
    holder = lock_holder(run_dir) if row["status"] != COMPLETE else None
    if holder:  # another process (a second campaign process sharing this sweep dir) runs it: no failure
        row["status"], problem = RUNNING, f"running in another process ({holder})"
    elif row["status"] == RUNNING:  # a record that says running, whose process is gone
        row["status"] = MISSING
    if problem is None and row["status"] != COMPLETE:
        problem = metrics.get("error") or f"status {row['status']!r}"
    row["problem"] = problem
    row["run_dir"] = str(run_dir)
    row["config_path"] = cfg_path
    row["dup_key"] = _dup_key(cfg, metrics)
    row["mtime"] = (metrics_path if metrics_path.is_file() else run_dir).stat().st_mtime
    return row


#: Each base pruner's target field (metrics.json, then its config `pruner.<field>`) and its wording.
TARGET_FIELDS = (
    ("speedup_target", "speedup", "{:g}x MACs"),  # DepGraph
    ("flops_target", "flops_target", "<= {:g}% FLOPs"),  # Gate Decorator (a fraction, shown in %)
    ("target_group_sparsity", "target_group_sparsity", "group sparsity {:g}"),  # OTOv2
)


def pruning_target(metrics: dict, cfg: dict) -> str:
    """The pruning target a run aimed at, in words ("2x MACs", "<= 50% FLOPs", "group sparsity
    0.5"); "" for a run without a pruner. A failed run says it from its config."""
    pruner_cfg = cfg.get("pruner") if isinstance(cfg.get("pruner"), dict) else {}
    for metric_key, cfg_key, text in TARGET_FIELDS:
        value = metrics.get(metric_key, pruner_cfg.get(cfg_key))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return text.format(value * 100 if metric_key == "flops_target" else value)
    return ""


#: DPM options an ablation sweeps that metrics.json does not record, read from the run's config
#: (`dpm.<name>`), and the variants they mean something to (release rule and budget act only with
#: Self-Rectifying, the schedule only when the decay is longer than one step).
CHOICE_FACETS = {"release_rule": ("sr",), "budget": ("sr",), "schedule": ("sp", "sr")}


def _choice_facets(cfg: dict, row: dict) -> dict:
    """`release_rule` / `budget` / `schedule` of a run (None where its variant does not use them), so
    that an ablation over them splits the table's rows and gets its plot."""
    dpm_cfg = cfg.get("dpm") if isinstance(cfg.get("dpm"), dict) else {}
    variant = row.get("variant", dpm_cfg.get("variant"))
    return {
        name: dpm_cfg.get(name) if variant in variants else None
        for name, variants in CHOICE_FACETS.items()
        if name not in row
    }


def load_runs(dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All runs under `dirs`, one row each, runs_frame's columns plus the config as `cfg.*` columns,
    `status`, `problem` (why it is not aggregated), `dup_key` and `duplicate_of` (the run dir kept
    for a config and seed that ran more than once: the newest complete one). Raises NoRunsError."""
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if missing:
        raise NoRunsError(f"not a directory: {', '.join(missing)}")
    run_dirs = find_run_dirs(dirs)
    if not run_dirs:
        raise NoRunsError(f"no runs (metrics.json or config.yaml) under {', '.join(map(str, dirs))}")
    frame = runs_frame(load_run(d) for d in run_dirs)
    if "sparse_learning" in frame:
        frame["sparse_learning"] = frame["sparse_learning"].map(_as_bool)
    frame["duplicate_of"] = None
    for _, group in frame.groupby("dup_key", sort=False):
        if len(group) < 2:
            continue
        complete = group[group["status"] == COMPLETE]
        keep = (complete if len(complete) else group).sort_values("mtime").index[-1]
        for idx in group.index:
            if idx != keep:
                frame.at[idx, "duplicate_of"] = frame.at[keep, "run_dir"]
    return frame


def _as_bool(value: Any) -> Any:
    """metrics.json records sparse_learning as a bool, the reference CSV as true/false/empty."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def aggregated_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that count: complete, and one per config and seed."""
    return frame[(frame["status"] == COMPLETE) & frame["duplicate_of"].isna()]


#: DPM hyper-parameters an ablation sweeps; they split a variant's row only where they vary.
SETTING_FACETS = ["N", "T_rate", "T_len", "release_rule", "budget", "schedule"]


def run_settings(runs: pd.DataFrame) -> pd.Series:
    """Per run, `N=.., T_rate=..` of the facets that vary within its (block, variant) group, else "".

    An ablation sweep has several +SR runs per seed that differ only in N / T_rate / T_len: they are
    separate rows of the table (never averaged together as if they were seeds) and separate paired
    comparisons. A table sweep (one setting per variant) gets "" everywhere: its layout is unchanged."""
    out = pd.Series("", index=runs.index, dtype=object)
    facets = [f for f in SETTING_FACETS if f in runs]
    if not facets or runs.empty:
        return out
    keys = [k for k in GROUP_KEYS if k in runs]
    for _, group in runs.groupby(keys, dropna=False, sort=False):
        varying = [f for f in facets if group[f].astype(str).nunique(dropna=False) > 1]
        if varying:
            out.loc[group.index] = [
                ", ".join(f"{f}={_facet_text(v)}" for f, v in zip(varying, values))
                for values in group[varying].itertuples(index=False)
            ]
    return out


def _facet_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)
