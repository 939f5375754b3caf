"""The pruner contract (dpm.pruners.protocol): the three bases with DPM inside are one typed
Protocol, and DepGraph's selection algorithm is the round-based one PruningRounds drives."""

from __future__ import annotations

import torch
from test_gate_decorator import gated, randomised
from test_otov2 import build

from dpm.core import RectifyConfig
from dpm.pruners import DecayingPruner, DepGraphPruner, PruningRounds, RoundPruner
from helpers import tiny_net

STRICT = RectifyConfig(budget="strict")


def depgraph() -> PruningRounds:
    model = tiny_net()
    pruner = DepGraphPruner(model, torch.randn(2, 3, 8, 8), num_classes=3)
    return PruningRounds(model, pruner, speedup=1.5, rounds=2, interval=5, N=3, rectify=STRICT)


def gate_decorator():
    return gated(randomised(tiny_net()), torch.randn(2, 3, 8, 8), N=3, rectify=STRICT)


def dhspg():
    return build(controller_N=3, rectify=STRICT)[3]


def test_every_base_with_dpm_is_a_decaying_pruner():
    for make in (depgraph, gate_decorator, dhspg):
        p = make()
        assert isinstance(p, DecayingPruner), make.__name__
        candidates = p.candidates()
        assert candidates and all(k == t.key for k, t in candidates.items()), make.__name__
        p.controller.register(candidates.values())  # they slice the controller's own parameters
        assert all(p.controller.status(k) == "registered" for k in candidates), make.__name__


def test_strict_replacements_come_from_the_pruner_itself():
    """budget=strict: the controller's replacement callback is the pruner's `replacement`."""
    for make in (depgraph, gate_decorator):
        p = make()
        assert p.controller.replacement == p.replacement, make.__name__


def test_depgraph_is_the_round_based_selection_algorithm():
    assert isinstance(DepGraphPruner(tiny_net(), torch.randn(2, 3, 8, 8), num_classes=3), RoundPruner)
