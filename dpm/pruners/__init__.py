"""The base pruning algorithms behind two small contracts (protocol.py): `DecayingPruner` (a base
with DPM's decay inside: PruningRounds, GateDecorator, DHSPG) and `RoundPruner` (what
PruningRounds drives: DepGraphPruner)."""

from dpm.pruners.depgraph import DepGraphPruner
from dpm.pruners.gate_decorator import GateDecorator
from dpm.pruners.otov2 import DHSPG
from dpm.pruners.protocol import DecayingPruner, RoundPruner
from dpm.pruners.rounds import PruningRounds

__all__ = ["DHSPG", "DecayingPruner", "DepGraphPruner", "GateDecorator", "PruningRounds", "RoundPruner"]
