"""The README's dpm.core example is real code: extract it and run it."""

import torch

from dpm.core import DecayController, RectifyConfig
from helpers import run_readme_example


def test_readme_example_runs_and_prunes():
    ns, printed = run_readme_example("core-example")
    ctl, chosen, conv, bn = ns["ctl"], ns["chosen"], ns["conv"], ns["bn"]
    assert isinstance(ctl, DecayController)
    assert str(ctl.counts()) in printed
    chosen_keys = {t.key for t in chosen}
    # Every admitted channel ended its decay: pruned (exactly zero) or released (still alive).
    assert ctl.decaying == frozenset()
    assert ctl.pruned | ctl.released == chosen_keys and ctl.pruned
    for _, c in ctl.pruned:
        assert conv.weight[c].count_nonzero() == 0 and conv.bias[c] == 0
        assert bn.weight[c] == 0 and bn.bias[c] == 0
    for _, c in ctl.released:
        assert conv.weight[c].count_nonzero() > 0
    untouched = [c for c in range(conv.out_channels) if ("conv", c) not in chosen_keys]
    assert all(conv.weight[c].count_nonzero() > 0 for c in untouched)
    # The checkpoint restores into a fresh controller on the same model.
    fresh = DecayController(ns["model"], N=20, rectify=RectifyConfig(t_rate=0.0, t_len=1.5))
    fresh.load_state_dict(ns["checkpoint"]["dpm"])
    assert (fresh.pruned, fresh.released) == (ctl.pruned, ctl.released)
    assert torch.equal(fresh.pruned_mask(conv.weight), ctl.pruned_mask(conv.weight))
