"""What the controller records per decay step (docs/method.md section 5, invariant 7).

Plain Python lists and dicts so a run can dump them to JSON / W&B as they are, and so they travel
in the controller's ``state_dict``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Hashable

__all__ = ["DecayLog", "QUANTILES"]

#: Percentiles of the C_rate / C_len distributions recorded at each checked decay step.
QUANTILES: dict[str, float] = {"min": 0.0, "p10": 0.1, "p50": 0.5, "p90": 0.9, "max": 1.0}


@dataclass
class DecayLog:
    """The controller's record.

    Attributes:
        history: one dict per optimizer step with decaying or pruned targets: ``step``, counts of
            ``decaying`` / ``pruned`` / ``released`` (cumulative), ``released_now`` and, at steps
            where releases were checked, ``c_rate`` and ``c_len`` percentile dicts (:data:`QUANTILES`).
        releases: ``{"step", "round", "key", "c_rate", "c_len"}`` per release.
        readmissions: ``{"step", "round", "key"}`` per admission of a previously released target.
        trajectories: ``key -> [(step, n, norm), ...]`` for the first ``track`` targets admitted
            (every one for ``track=None``; n = decay step; norm = ||x|| right after it, for released
            targets the unprojected norm).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    readmissions: list[dict[str, Any]] = field(default_factory=list)
    trajectories: dict[Hashable, list[tuple[int, int, float]]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the record (trajectories as a list of (key, points) pairs)."""
        return {
            "history": copy.deepcopy(self.history),
            "releases": copy.deepcopy(self.releases),
            "readmissions": copy.deepcopy(self.readmissions),
            "trajectories": [(k, list(v)) for k, v in self.trajectories.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a record saved by :meth:`state_dict`."""
        self.history = copy.deepcopy(state["history"])
        self.releases = copy.deepcopy(state["releases"])
        self.readmissions = copy.deepcopy(state["readmissions"])
        self.trajectories = {k: [tuple(p) for p in v] for k, v in state["trajectories"]}
