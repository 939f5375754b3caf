"""Where the CPU-scale campaign's runs and records live (experiments/cpu_scale/campaign.py runs them).

A run ran in `$DPM_OUTPUT_ROOT/cpu_scale/<stage>/<run>` (its sweep dir; checkpoints, never
committed); its record (RECORD_FILES, RECORD_GZIPPED gzipped; no weights) is archived under
`results/cpu_scale/runs/<stage>/<run>` as soon as it finishes, and put back into a fresh checkout's
sweep dir, where the sweep then skips it: that is how the campaign is carried across sittings. The
selection's choices sit beside them in `results/cpu_scale/selection/`. Reads and copies files only;
no run starts here.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "cpu_scale"


# What a finished run's record is (no checkpoints): enough to skip the run when a stage is re-run and
# to rebuild the report. Large JSON logs are kept gzipped.
RECORD_FILES = ("metrics.json", "config.yaml")
RECORD_GZIPPED = ("dpm_log.json", "gate_decorator_ticks.json")


# Baseline fields that must come out the same when a later sitting re-makes a baseline.
BASELINE_FIELDS = ("top1_final", "val_top1_final", "test_loss_final")


def results_dir(smoke: bool) -> Path:
    """Committed results for the real campaign; smoke results stay in the output tree."""
    return output_root() / "cpu_scale" / "results_smoke" if smoke else RESULTS


def output_root() -> Path:
    return Path(os.environ.get("DPM_OUTPUT_ROOT", ROOT / "outputs"))


def sweep_dir(stage: str) -> Path:
    return output_root() / "cpu_scale" / stage


def archive_dir(stage: str, smoke: bool) -> Path:
    """Where the records of a stage's finished runs are kept: committed with the results, so a later
    sitting (a fresh checkout, no output tree) skips them."""
    return results_dir(smoke) / "runs" / stage


def archive(stage: str, smoke: bool) -> int:
    """Copy the record of every finished run of `stage` not archived yet into archive_dir; returns
    how many were added."""
    added = 0
    for metrics_path in sorted(sweep_dir(stage).glob("*/metrics.json")):
        dest = archive_dir(stage, smoke) / metrics_path.parent.name
        if not (dest / "metrics.json").exists() and _finished_record(metrics_path):
            _copy_record(metrics_path.parent, dest, pack=True)
            added += 1
    return added


def restore(stage: str, smoke: bool) -> int:
    """Put every archived record of `stage` back into its sweep dir where that run is not finished
    there (a fresh checkout): the sweep then skips it. Returns how many were restored."""
    restored = 0
    for metrics_path in archived_metrics(stage, smoke):
        run_dir = sweep_dir(stage) / metrics_path.parent.name
        if not (run_dir / "metrics.json").exists() or not _finished_record(run_dir / "metrics.json"):
            _copy_record(metrics_path.parent, run_dir, pack=False)
            restored += 1
    return restored


def _finished(metrics: dict) -> bool:
    """A finished run: complete, or short of its target (never eligible, but archived and listed like
    a complete one: re-running it gives the same record)."""
    from dpm.run import FINISHED

    return metrics.get("status") in FINISHED


def _finished_record(metrics_path: Path) -> bool:
    return _finished(json.loads(metrics_path.read_text()))


def _copy_record(src: Path, dest: Path, pack: bool) -> None:
    """RECORD_FILES as they are and RECORD_GZIPPED gzipped (`pack`) or back unzipped; each file
    written whole, metrics.json last, so a kill mid-copy leaves no record that looks done."""
    from dpm.checkpoint import atomic_write_bytes

    for name in RECORD_GZIPPED:
        source, target = (src / name, dest / f"{name}.gz") if pack else (src / f"{name}.gz", dest / name)
        if source.exists():
            data = source.read_bytes()
            atomic_write_bytes(target, gzip.compress(data, mtime=0) if pack else gzip.decompress(data))
    for name in reversed(RECORD_FILES):
        atomic_write_bytes(dest / name, (src / name).read_bytes())


def check_baselines(smoke: bool) -> None:
    """The baselines a sitting re-makes (checkpoints are not committed) must be the archived ones,
    or the archived runs of a seed and the new ones would start from different models."""
    made = {m["seed"]: m for m in runs_of(sweep_dir("pretrain"))}
    for metrics_path in archived_metrics("pretrain", smoke):
        old = json.loads(metrics_path.read_text())
        new = made.get(old["seed"])
        if new is None:  # a seed this sitting did not ask for
            continue
        differ = [f"{k} {old.get(k)} -> {new.get(k)}" for k in BASELINE_FIELDS if old.get(k) != new.get(k)]
        if differ:
            raise SystemExit(
                f"seed {new['seed']}: the re-made baseline differs from the archived one ({'; '.join(differ)}): "
                f"re-make it on the kind of host (CPU model, bf16 support), torch build and thread "
                f"count (OMP_NUM_THREADS, CAMPAIGN_LAUNCHER) of the archived runs, or move "
                f"{archive_dir('', smoke)} aside to start the campaign over"
            )


def runs_of(directory: Path) -> list[dict]:
    """The finished runs' metrics (complete or target_missed: `target_met` tells them apart), with
    `run_dir` where each record is now (a restored record names the dir it ran in)."""
    found = [{**json.loads(p.read_text()), "run_dir": str(p.parent)} for p in sorted(directory.rglob("metrics.json"))]
    return [m for m in found if _finished(m)]


def chosen_path(base: str, smoke: bool) -> Path:
    """Where `base`'s selection keeps its choice (its table's N and thresholds)."""
    return results_dir(smoke) / "selection" / f"chosen_{base}.json"


def chosen(base: str, smoke: bool) -> dict:
    path = chosen_path(base, smoke)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `campaign.py select --bases {base}` first")
    return json.loads(path.read_text())


VARIANTS = ("base", "sp", "sr")


def table_run_name(seed: int | str, variant: str) -> str:
    """A table run's folder: its seed and variant (not its job number), since sittings may run
    different seeds. Spelled once: with Hydra interpolations it is the sweep's subdir."""
    return f"s{seed}_{variant}"


def pretrain_run_name(seed: int | str) -> str:
    """A baseline's folder: its seed."""
    return f"s{seed}"


TABLE_SUBDIR = table_run_name("${seed}", "${dpm.variant}")
PRETRAIN_SUBDIR = pretrain_run_name("${seed}")


def table_archived(base: str, seed: int, smoke: bool) -> int:
    """How many variants of `base` at `seed` have a finished record in the archive."""
    archived = archive_dir(f"table_{base}", smoke)
    return sum((archived / table_run_name(seed, v) / "metrics.json").exists() for v in VARIANTS)


def table_done(base: str, seed: int, smoke: bool) -> bool:
    """Whether every variant of `base` at `seed` has a finished record in the archive."""
    return table_archived(base, seed, smoke) == len(VARIANTS)


def archived_metrics(stage: str, smoke: bool) -> list[Path]:
    """The metrics.json of every archived run of `stage`."""
    return sorted(archive_dir(stage, smoke).glob("*/metrics.json"))


def seed_list(seeds: list[int]) -> str:
    """0-4, 7, 9: runs of consecutive seeds shortened."""
    spans: list[list[int]] = []
    for s in seeds:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans) or "none"
