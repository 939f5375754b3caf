"""The run-side glue of each base pruner, one module per base (see dpm.stages.base for the
contract): the runner looks a stage up here by ``pruner.name``."""

from __future__ import annotations

from dpm.stages import depgraph, gate_decorator, otov2
from dpm.stages.base import CHECKPOINT, RunContext, Stage

__all__ = ["STAGES", "stage_for", "CHECKPOINT", "RunContext", "Stage"]

#: pruner.name -> its stage module (no pruner runs DepGraph's stage without rounds).
STAGES = {"none": depgraph, "depgraph": depgraph, "otov2": otov2, "gate_decorator": gate_decorator}


def stage_for(name: str) -> Stage:
    """The stage module of ``pruner.name`` (a KeyError for a name dpm.config.validate refuses)."""
    return STAGES[name]
