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

import sys

from dpm.errors import UserError
from dpm.quickstart import CONF_DIR, compose
from dpm.run import _hydra_entry, check_overrides, sweep_verdict

# Config groups of conf/ a user picks from (hydra/ and recipe/ are chosen for them).
HELP_GROUPS = ("experiment", "model", "dataset", "pruner", "dpm", "trainer", "logger")


def main(argv: list[str] | None = None) -> None:
    """Dispatch the command line (see the module docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
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
        from dpm.quickstart import main as run_main_job

        rows = run_main_job(args)
        if any(r.get("status") != "complete" for r in rows):
            sys.exit(1)
        return
    sys.argv = [sys.argv[0], *args]
    _hydra_entry()()
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
    lines += ["", "README.md has the recipes, hardware, times and expected numbers. Hydra's own options: "
                  "python -m dpm --hydra-help"]
    return "\n".join(lines)
