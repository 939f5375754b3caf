"""Hydra callbacks. `ReportCallback` writes the dpm report of a sweep when the multirun ends
(registered in conf/config.yaml under `hydra.callbacks`), into `<sweep dir>/report`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """`python -m dpm -m ...` ends with `python -m dpm.report <sweep dir>` (without printing it)."""

    def __init__(self, plots: bool = True):
        self.plots = plots

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dpm.report import NoRunsError, report_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = report_runs([sweep_dir], config.logger, plots=self.plots)
        except NoRunsError as err:
            log.warning("no report: %s", err)
            return
        except Exception:  # noqa: BLE001  (the sweep's runs are done and saved; a report bug must not fail it)
            log.exception("writing the report of %s failed; run `python -m dpm.report %s`", sweep_dir, sweep_dir)
            return
        n_bad = len(report.problems)
        log.info("report: %s (%d runs, %d failed or incomplete)", report.out / "report.md", len(report.runs), n_bad)
