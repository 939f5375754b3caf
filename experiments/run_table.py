"""One paper table or ablation as two Hydra multiruns: the pretrained baselines first, then the sweep
that prunes them. The entry scripts under experiments/paper/ and experiments/ablation/ call this.

    python experiments/run_table.py EXPERIMENT [overrides...]

    EXPERIMENT  an experiment config, e.g. paper/depgraph_resnet56_cifar10 or ablation/depgraph_N
    overrides   extra Hydra overrides for both sweeps (e.g. trainer.device=cuda dataset.val_size=5000)

Environment:
    SEEDS     seed list, e.g. 0,1,2 (default: the experiment's `seed` sweep if it has one, else 0,1,2;
              0 with SMOKE=1)
    VARIANTS  variants of a table (default base,sp,sr); ignored for an experiment that defines its
              own sweep (`hydra.sweeper.params`, the ablations)
    LAUNCHER  launcher overrides, e.g. "hydra/launcher=slurm hydra.launcher.partition=gpu"
              (default: the basic launcher, jobs one after another in this process)
    SMOKE=1   run the experiment's smoke version (`<group>/smoke/<name>`: tiny model, synthetic data,
              a few steps on CPU)
    OUT       the table's folder (default <output_root>/<name>/table_<time>): pretrain/ and prune/
              hold the two sweeps, prune/report the report

Why two sweeps: base, +SP and +SR of a seed start from the same pretrained baseline (the cache under
`cache_dir`, keyed by model, data, seed and pretrain recipe: dpm.run.pretrain_key_fields). Warming
the cache first with one run per seed pretrains 5 models for a 3-variant x 5-seed table, not 15, and
no job waits on another's cache lock. The warm-up runs are `pruner=none trainer.finetune.epochs=0`
with the experiment's model, data and pretrain recipe written out as overrides; their cache key is
checked to equal the prune runs' before anything starts. Tables with DepGraph's sparse learning
warm up with the experiment itself (`dpm=base pruner.rounds=1 trainer.finetune.epochs=1`), so that
the sparse-learning result, cached like the pretrain, is shared too. Without pretraining (OTOv2
trains from scratch, or `pretrain.checkpoint=PATH`) only the prune sweep runs.

With a SLURM launcher the warm-up sweep is submitted first (its submitting process runs in the
background); as soon as its job array exists, the prune sweep is submitted with
`--dependency=afterok:<array id>` (and `--kill-on-invalid-dep=yes`, so a failed warm-up cancels
the prune jobs instead of leaving them pending). Both submitting processes wait for their jobs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Override keys of the prune sweep that must not reach the pretrain sweep (they name a pruner's keys,
# or the stages after pretraining, which `pruner=none trainer.finetune.epochs=0` replaces).
PRUNE_ONLY = (
    "pruner",
    "dpm",
    "experiment",
    "trainer.finetune",
    "trainer.sparse",
    "name",
    "table",
    "ablation",
    "hydra.sweep",
    "hydra.sweeper",
)
SUBMIT_WAIT_S = float(os.environ.get("DPM_SUBMIT_WAIT_S", 600))


def compose(overrides: list[str]):
    """The config `python -m dpm <overrides>` would run, with Hydra's node (choices, sweeper params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import dpm.config  # noqa: F401  (registers the schema)
    from dpm.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def hydra_value(value) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)  # inf, -inf, nan: Hydra's spelling too
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def leaf_overrides(prefix: str, tree: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`prefix.key=value` for every leaf of a config subtree (`skip`: top-level keys left out)."""
    out = []
    for key, value in tree.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            out += leaf_overrides(f"{prefix}{key}.", value)
        else:
            out.append(f"{prefix}{key}={hydra_value(value)}")
    return out


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_values(cfg, key: str) -> str | None:
    """The experiment's own sweep of `key` (hydra.sweeper.params), as Hydra's comma list."""
    params = cfg.hydra.sweeper.get("params") or {}
    value = params.get(key)
    return None if value is None else str(value)


def first_values(overrides: list[str]) -> list[str]:
    """Each `key=a,b,c` sweep replaced by its first value (to compose one point of a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        out.append(
            f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
        )
    return out


def sweep_points(cfg, cli: list[str]) -> list[list[str]]:
    """Every point of the prune sweep as override lists (experiment sweep params x command line sweeps)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = {k: str(v) for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    for o in OverridesParser.create().parse_overrides(cli):
        params[o.get_key_element()] = (
            ",".join(o.sweep_string_iterator()) if o.is_sweep_override() else o.input_line.split("=", 1)[1]
        )
    axes = [
        [
            f"{k}={v}"
            for v in (
                OverridesParser.create().parse_override(f"{k}={vals}").sweep_string_iterator()
                if "," in vals
                else [vals]
            )
        ]
        for k, vals in params.items()
    ]
    return [list(p) for p in itertools.product(*axes)]


def plan(experiment: str, extra: list[str], seeds: str, variants: str | None) -> dict:
    """The two sweeps' override lists, and which kind of warm-up the experiment needs."""
    from omegaconf import OmegaConf

    from dpm.config import validate
    from dpm.errors import UserError
    from dpm.run import pretrain_key_fields

    base = [f"experiment={experiment}", *extra]
    cfg = compose(first_values(base))
    own_sweep = bool(cfg.hydra.sweeper.get("params"))
    prune = [*base]
    if variants and not own_sweep:
        prune.append(f"dpm={variants}")
    prune.append(f"seed={seeds}")
    points = sweep_points(cfg, prune[1:])
    first_seed = seeds.split(",")[0]
    prune_cfgs = [compose([base[0], *p]) for p in points if f"seed={first_seed}" in p][:24]
    for c in prune_cfgs:
        validate(c)
    c = prune_cfgs[0]
    name = c.name
    pretrains = c.trainer.pretrain.epochs > 0 and not c.pretrain.checkpoint and c.pretrain.cache
    if not pretrains:
        return {"cfg": c, "name": name, "warmup": None, "prune": prune, "kind": "none"}
    choices = c.hydra.runtime.choices
    if c.pruner.name == "depgraph" and c.trainer.sparse.epochs > 0:
        # The sparse-learning result is cached too: warm it up with the experiment itself.
        kind = "sparse"
        # One run per seed: the experiment's own sweep (an ablation's) is pinned to its first point.
        pinned = [
            first_values([f"{k}={v}"])[0] for k, v in (c.hydra.sweeper.get("params") or {}).items() if k != "seed"
        ]
        warmup = [*base, *pinned, "dpm=base", "pruner.rounds=1", "trainer.finetune.epochs=1"]
    else:
        kind = "pretrain"
        passthrough = [o for o in extra if not override_key(o).startswith(PRUNE_ONLY)]
        model = OmegaConf.to_container(c.model, resolve=True)
        dataset = OmegaConf.to_container(c.dataset, resolve=True)
        warmup = [
            f"model={choices.model}",
            f"dataset={choices.dataset}",
            f"trainer={choices.trainer}",
            *passthrough,
            "pruner=none",
            "dpm=base",
            "trainer.finetune.epochs=0",
            "trainer.sparse.epochs=0",
            *leaf_overrides("model.", model),
            *leaf_overrides("dataset.", dataset, skip=("root",)),
            # The whole trainer but the later phases: the baseline trains exactly as the prune
            # runs would train it (recipe, device, fast path, bf16 left null to resolve alike).
            *leaf_overrides("trainer.", OmegaConf.to_container(c.trainer, resolve=True), skip=("finetune", "sparse")),
            f"cache_dir={hydra_value(c.cache_dir)}",
        ]
    # Its report lists the baselines' accuracy per seed; plots of pretraining alone say nothing.
    warmup += [
        f"name={name}_pretrain",
        "table=null",
        "ablation=null",
        f"seed={seeds}",
        "hydra.sweep.subdir='seed_${seed}'",
        "+hydra.callbacks.report.plots=false",
    ]
    # The warm-up must fill exactly the cache entries the prune runs read.
    warm_cfg = compose(first_values(warmup))
    validate(warm_cfg)
    want = pretrain_key_fields(warm_cfg)
    for other in prune_cfgs:
        if pretrain_key_fields(other) != want or other.cache_dir != warm_cfg.cache_dir:
            raise UserError(
                f"the pretrain sweep of {experiment} would not fill the cache its prune runs read "
                f"(pretrain keys differ): {json.dumps(pretrain_key_fields(other), default=str)} vs "
                f"{json.dumps(want, default=str)}"
            )
    return {"cfg": c, "name": name, "warmup": warmup, "prune": prune, "kind": kind}


def dpm_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpm", "-m", *overrides]


def wait_for_array_id(sweep_dir: Path, proc: subprocess.Popen) -> str:
    """The SLURM job (array) id of a sweep being submitted by `proc`: submitit moves each task's files
    to `<sweep dir>/.submitit/<array id>_<task>` right after sbatch returns."""
    deadline = time.time() + SUBMIT_WAIT_S
    folder = sweep_dir / ".submitit"
    while time.time() < deadline:
        if folder.is_dir():
            for p in folder.iterdir():
                m = re.fullmatch(r"(\d+)(?:_\d+)?", p.name)
                if m and p.is_dir():
                    return m[1]
        if proc.poll() is not None:
            raise SystemExit(f"the pretrain sweep exited ({proc.returncode}) before submitting its jobs")
        time.sleep(0.5)
    raise SystemExit(f"no SLURM job of the pretrain sweep under {folder} after {SUBMIT_WAIT_S:.0f} s")


def main(argv: list[str]) -> int:
    from dpm.errors import UserError

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    experiment, extra = argv[0], argv[1:]
    smoke = os.environ.get("SMOKE", "") not in ("", "0")
    if smoke:
        group, _, leaf = experiment.rpartition("/")
        experiment = f"{group}/smoke/{leaf}" if group else f"smoke/{leaf}"
    launcher = shlex.split(os.environ.get("LAUNCHER", ""))
    variants = os.environ.get("VARIANTS", "base,sp,sr")
    try:
        own = compose([f"experiment={experiment}", *first_values(extra)])
        seeds = os.environ.get("SEEDS") or sweep_values(own, "seed") or ("0" if smoke else "0,1,2")
        p = plan(experiment, extra, seeds, variants)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(
        os.environ.get("OUT") or Path(p["cfg"].output_root) / p["name"] / time.strftime("table_%Y-%m-%d_%H-%M-%S")
    )
    pre_dir, prune_dir = out / "pretrain", out / "prune"
    prune = [*p["prune"], *launcher, f"hydra.sweep.dir={prune_dir}"]
    slurm = any("slurm" in o for o in launcher)
    print(f"{experiment}: seeds {seeds}; warm-up: {p['kind']}; sweeps under {out}", flush=True)
    if p["warmup"] is None:
        rc = subprocess.call(dpm_cmd(prune), cwd=ROOT)
    else:
        warmup = [*p["warmup"], *launcher, f"hydra.sweep.dir={pre_dir}"]
        if not slurm:
            rc = subprocess.call(dpm_cmd(warmup), cwd=ROOT)
            if rc != 0:
                print(f"error: the pretrain sweep failed ({rc}): see {pre_dir}", file=sys.stderr)
                return rc
            rc = subprocess.call(dpm_cmd(prune), cwd=ROOT)
        else:
            pre_dir.mkdir(parents=True, exist_ok=True)
            with open(out / "pretrain_sweep.log", "w") as log:
                warm = subprocess.Popen(dpm_cmd(warmup), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                try:
                    array = wait_for_array_id(pre_dir, warm)
                    print(f"pretrain sweep: SLURM job {array}; prune sweep depends on it (afterok)", flush=True)
                    after = [
                        f"+hydra.launcher.additional_parameters.dependency=afterok:{array}",
                        "+hydra.launcher.additional_parameters.kill_on_invalid_dep=yes",
                    ]
                    rc = subprocess.call(dpm_cmd([*prune, *after]), cwd=ROOT)
                finally:
                    warm_rc = warm.wait()
            if warm_rc != 0:
                print(
                    f"error: the pretrain sweep failed ({warm_rc}): see {out / 'pretrain_sweep.log'}", file=sys.stderr
                )
                rc = rc or warm_rc
    report = prune_dir / "report" / "report.md"
    print(f"report: {report if report.exists() else '(none: ' + str(prune_dir) + ' holds no runs)'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
