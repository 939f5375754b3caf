"""Hydra callbacks. `ReportCallback` writes the dpm report of a sweep when the multirun ends
(registered in conf/config.yaml under `hydra.callbacks`), into `<sweep dir>/report`.

With the submitit launchers (`hydra/launcher=slurm`) the callback runs in the submitting process,
after every job of the sweep has ended. A multirun that fails (a job crashed, was killed or was
cancelled: Hydra raises before `on_multirun_end`) still gets its report, written when the
submitting process exits, with the failed runs listed as such."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dpm.report import NoRunsError, problem_counts, report_runs

log = logging.getLogger(__name__)
# The report of the last multirun this process ran (dpm.run.sweep_verdict reads it for the exit code).
LAST_REPORT = None


class ReportCallback(Callback):
    """`python -m dpm -m ...` ends with `python -m dpm.report <sweep dir>` (without printing it)."""

    def __init__(self, plots: bool = True):
        self.plots = plots
        self._unreported: DictConfig | None = None  # a started multirun whose report is not written yet

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has no "multirun failed" hook: a failed job makes the sweeper raise, so that
        # on_multirun_end never runs. The report is then written at exit (Hydra exits with 1).
        self._unreported = config
        atexit.register(self._report_at_exit)

    def _report_at_exit(self) -> None:
        config, self._unreported = self._unreported, None
        if config is not None:
            log.warning("the multirun did not finish (a job failed, or was killed or cancelled): reporting what ran")
            self.on_multirun_end(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._unreported = None

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = report_runs([sweep_dir], config.logger, plots=self.plots)
        except NoRunsError as err:
            log.warning("no report: %s", err)
            return
        except Exception:  # noqa: BLE001  (the sweep's runs are done and saved; a report bug must not fail it)
            log.exception("writing the report of %s failed; run `python -m dpm.report %s`", sweep_dir, sweep_dir)
            return
        global LAST_REPORT
        LAST_REPORT = report
        _, failed, running = problem_counts(report.problems)
        log.info(
            "report: %s (%d runs, %d failed or incomplete, %d running in another process)",
            report.out / "report.md",
            len(report.runs),
            failed,
            running,
        )
