"""`python -m dpm [overrides]` (and the `dpm` console script): the main job, one run, or a sweep.

* no Hydra option, no `dpm=` and no `hydra.` override, and a base pruner in the composed config:
  the main job, base / +SP / +SR from one shared pretrained baseline with the overrides applied to
  all three, their table and report (:func:`dpm.quickstart.main`);
* `dpm=<variant>` (or an experiment without a pruner, or `hydra.run.dir=...`): one run;
* `-m` / `--multirun`: a sweep, ending with its report; it exits 1 if a run failed or missed its
  pruning target;
* `--help`: dpm's own help (`--hydra-help` for Hydra's).
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpm import callbacks
from dpm.config import CONF_DIR, compose
from dpm.errors import UserError
from dpm.quickstart import main as run_main_job
from dpm.report import format_runs, problem_counts
from dpm.run import run
from dpm.run_lock import RunDirBusy

# Run dirs of this process's multirun jobs that stopped with a UserError (sweep_verdict reads them).
SWEEP_FAILURES: list[str] = []
# Run dirs of this process's multirun jobs that another live process holds (RunDirBusy): skipped,
# not failed; their holder runs them and its exit status covers them.
SWEEP_BUSY: list[str] = []
# Run dirs of the jobs this process ran in the current multirun (the basic launcher runs them here;
# a remote launcher's jobs run elsewhere and leave it empty): the sweep's exit status is about them.
SWEEP_RUN_DIRS: list[str] = []
# Config groups of conf/ a user picks from (hydra/ and recipe/ are chosen for them).
HELP_GROUPS = ("experiment", "model", "dataset", "pruner", "dpm", "trainer", "logger")


def main(argv: list[str] | None = None) -> None:
    """Dispatch the command line (see the module docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None:
        # A crash in native code (a segfault, glibc aborting on a corrupted heap) kills the process
        # without a Python traceback; this prints every thread's Python stack to stderr first, so
        # a crash seen on one host only still names the line that was running.
        faulthandler.enable()
    if any(a in ("--help", "-h") for a in args):
        print(help_text())
        return
    try:
        check_overrides(args)
        main_job = is_main_job(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if main_job:
        rows = run_main_job(args)
        if any(r.get("status") != "complete" for r in rows):
            sys.exit(1)
        return
    sys.argv = [sys.argv[0], *args]
    hydra_entry()()
    sweep_verdict()


def is_main_job(args: list[str]) -> bool:
    """True when the command line asks for the main job (see the module docstring)."""
    for arg in args:
        if arg.startswith("-"):
            return False  # -m, --cfg, --info, ...: Hydra's own
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in ("dpm", "dpm.variant") or key.startswith(("hydra.", "hydra/")):
            return False
    return compose(args).pruner.name != "none"


def options(group: str) -> list[str]:
    """The options of a config group, from conf/ (the typed schemas are not options)."""
    folder = CONF_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def help_text() -> str:
    """`python -m dpm --help`."""
    recipes = {e: options(f"recipe/{e}") for e in sorted(p.name for p in (CONF_DIR / "recipe").iterdir())}
    lines = [
        "dpm: the Decay Pruning Method (arXiv 2406.03879), reproducible",
        "",
        "  python -m dpm [key=value ...]            the main job: base / +SP / +SR from one shared pretrained",
        "                                           baseline, their table and report (outputs/<name>/<time>/)",
        "  python -m dpm dpm=sp [key=value ...]     one variant, one run (dpm=base | sp | sr)",
        "  python -m dpm -m key=a,b [key=value ...] a sweep (Hydra multirun), ending with its report",
        "  python -m dpm [key=value ...] --cfg job  the composed config: every key and its value",
        "  python -m dpm.report DIR ...             the report of finished runs",
        "",
        "The main job runs experiment=quickstart unless you name another; pruner=depgraph (its default),",
        "otov2 or gate_decorator; any key=value applies to all three variants (e.g. seed=1, model=tiny_resnet).",
        "A run that ends short of its pruning target is `target_missed`, not `complete` (exit status 1).",
        "",
        "Config groups (group=option):",
    ]
    for group in HELP_GROUPS:
        lines.append(f"  {group}: {', '.join(options(group))}")
    lines += ["", "Recipes adapting an experiment to a base pruner (conf/recipe/<experiment>/<pruner>.yaml):"]
    lines += [f"  {e}: {', '.join(r)}" for e, r in recipes.items()]
    lines += [
        "",
        "README.md has the recipes, hardware, times and expected numbers. Hydra's own options: "
        "python -m dpm --hydra-help",
    ]
    return "\n".join(lines)


def print_summary(metrics: dict) -> None:
    source = {
        "trained": "pretrained here",
        "cache": "pretrained baseline reused from the cache",
        "checkpoint": "weights from pretrain.checkpoint",
        "scratch": "no pretraining",
    }
    print(
        f"\ndpm {metrics['name']}: {metrics['model']} on {metrics['dataset']} ({metrics.get('train_size')} "
        f"train images), {metrics.get('device')}, {source.get(metrics.get('pretrain_source'), '')}"
    )
    print(format_runs([metrics]))
    if metrics.get("status") == "target_missed":
        print(f"\ntarget_missed: {metrics['error']}")
    print(f"\nmetrics: {Path(metrics['run_dir']) / 'metrics.json'}")


def hydra_entry():
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def hydra_main(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        if sweep:
            SWEEP_RUN_DIRS.append(str(run_dir))
        try:
            metrics = run(cfg, run_dir)
        except UserError as err:
            if sweep and isinstance(err, RunDirBusy):  # the holder runs and reports it: no failure here
                print(f"skipped: {run_dir} is run by another process ({err.holder}), which reports it", file=sys.stderr)
                SWEEP_BUSY.append(str(run_dir))
                return
            print(f"error: {err}", file=sys.stderr)
            if sweep:
                # One line, no traceback: the sweep's other points still run, its report lists this
                # run as failed, and main() exits non-zero at the end.
                SWEEP_FAILURES.append(str(run_dir))
                return
            sys.exit(2)
        if not metrics.get("rank"):  # DDP: rank 0 reports
            print_summary(metrics)
        if metrics.get("status") == "target_missed" and not sweep:
            sys.exit(1)

    return hydra_main


def check_overrides(args: list[str]) -> None:
    """Compose the config the command line asks for (each value of a sweep once) and turn Hydra's
    multi-line composition errors into one line naming the key, the bad value and the fix.
    Hydra's own options (`-m`, `--cfg`, ...) and `hydra.*` overrides are left to Hydra."""
    plain, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"):
            return  # another primary config: Hydra reports its own errors
        if arg in ("--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun"):
            i += 1 if arg in ("--info", "-i") and (i + 1 >= len(args) or "=" in args[i + 1]) else 2
            continue
        if not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            plain.append(arg)
        i += 1
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as err:
        raise UserError(f"{str(err).strip().splitlines()[0]}: write overrides as key=value") from None
    first = [
        o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        for o in parsed
    ]
    trials = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            trials += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1 :] for v in o.sweep_string_iterator()]
    for overrides in trials:
        try:
            compose(overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise UserError(composition_error_line(err)) from None
    # A sweep's run dirs are named after its overrides: many overrides exceed a file name's 255 bytes.
    excluded = set(OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    named = [o for o in first if o.split("=", 1)[0].lstrip("+~") not in excluded]
    if (
        any(a in ("-m", "--multirun") for a in args)
        and len(",".join(named)) > 230
        and not any(a.startswith("hydra.sweep.subdir=") for a in args)
    ):
        raise UserError(
            f"the sweep's run-dir names ({len(','.join(named))} characters of overrides) would exceed the "
            f"file-name limit: add 'hydra.sweep.subdir=${{hydra.job.num}}' (numbered run dirs)"
        )


def composition_error_line(err: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the value, the fix."""
    cause = err.__cause__ or err
    text = str(err).strip()
    if "Could not find '" in text:  # an unknown option of a config group
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        options = [
            line.strip()
            for line in text.split("Available options in", 1)[-1].splitlines()[1:]
            if line.startswith("\t") and "=" not in line and not line.strip().endswith("_schema")
        ]
        group, _, name = missing.rpartition("/")
        return f"{group}={name}: no such {group} config; valid: {', '.join(options) or '(none)'}"
    key = getattr(cause, "full_key", None)
    message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if key and "could not be converted to" in message:
        kind = message.rsplit(" ", 1)[-1].lower()
        return f"{key}: {message}: give {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if key and " not in " in message:
        return (
            f"{key}: no such key ({message}): check the spelling; "
            "`python -m dpm <overrides> --cfg job` prints every key"
        )
    return f"{text.splitlines()[0]}: {message}" if message not in text else text.splitlines()[0]


def sweep_verdict() -> None:
    """After a multirun: exit 1 with one line when one of its runs failed or ended short of its
    target, read from the sweep's report. The report covers the whole sweep dir; the verdict covers
    the sweep's own runs: the jobs this process ran (SWEEP_RUN_DIRS) but those another live process
    holds (SWEEP_BUSY: skipped with a line, their holder reports them), or with a remote launcher
    every run in the dir but those another process is still running. A sweep dir shared with another
    process (the CPU-scale campaign runs two) may hold that process's killed or unfinished runs."""
    report, callbacks.LAST_REPORT = callbacks.LAST_REPORT, None
    resolved = lambda dirs: {str(Path(d).resolve()) for d in dirs}  # noqa: E731
    launched, busy = resolved(SWEEP_RUN_DIRS), resolved(SWEEP_BUSY)
    own = launched - busy
    SWEEP_RUN_DIRS.clear()
    SWEEP_BUSY.clear()
    missed = failed = total = 0
    if report is not None:
        problems = report.problems
        if launched:
            # isin: a boolean mask even when there is no problem (an empty map() would select columns)
            problems = problems[problems["run_dir"].map(lambda d: str(Path(d).resolve())).isin(own)]
        missed, failed, running = problem_counts(problems)
        total = len(own) if launched else len(report.runs) - running
    failed = max(failed, len(SWEEP_FAILURES))
    SWEEP_FAILURES.clear()
    skipped = f"; {len(busy)} skipped: another process runs them" if busy else ""
    if missed or failed:
        total = max(total, failed)
        where = f": see {report.out / 'report.md'}" if report is not None else ""
        print(
            f"error: {missed + failed} of {total} runs did not complete ({missed} short of their pruning target, "
            f"{failed} failed or incomplete{skipped}){where}",
            file=sys.stderr,
        )
        sys.exit(1)
    if busy:
        print(
            f"sweep: {len(busy)} of {len(launched)} runs skipped: another process runs them and reports them",
            file=sys.stderr,
        )
