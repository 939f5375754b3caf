"""Target descriptions (docs/method.md section 2)."""

import pytest
import torch
from torch import nn

from dpm.core import DecayController, Slice, Target, channel_targets


def test_slice_normalises_and_validates():
    w = nn.Parameter(torch.zeros(4, 3, 2, 2))
    s = Slice(w, -4, torch.tensor([2, 0]))
    assert s.dim == 0 and s.indices == (2, 0) and s.numel() == 24
    with pytest.raises(ValueError, match="out of range"):
        Slice(w, 4, (0,))
    with pytest.raises(ValueError, match="out of range"):
        Slice(w, 1, (3,))
    with pytest.raises(ValueError, match="empty"):
        Slice(w, 0, ())
    with pytest.raises(ValueError, match="duplicates"):
        Slice(w, 0, (1, 1))


def test_target_needs_a_producer_and_hashable_keys():
    w = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="no producer"):
        Target("t", "f", (Slice(w, 1, (0,), consumer=True),))
    with pytest.raises(TypeError):
        Target(["unhashable"], "f", (Slice(w, 0, (0,)),))
    t = Target("t", "f", (Slice(w, 0, (0,)), Slice(w, 1, (0,), consumer=True)))
    assert len(t.producers) == 1 and len(t.consumers) == 1


def test_channel_targets_builds_one_target_per_channel():
    conv, bn, nxt = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
    ts = channel_targets(
        "conv",
        [(conv.weight, 0), (conv.bias, 0), (bn.weight, 0), (bn.bias, 0)],
        consumers=[(nxt.weight, 1)],
        channels=[1, 3],
    )
    assert [t.key for t in ts] == [("conv", 1), ("conv", 3)]
    assert {t.family for t in ts} == {"conv"}
    assert all(len(t.producers) == 4 and len(t.consumers) == 1 for t in ts)
    assert ts[1].producers[0].indices == (3,) and ts[1].consumers[0].dim == 1
    with pytest.raises(ValueError, match="disagree"):
        channel_targets("bad", [(conv.weight, 0), (nxt.weight, 0)])


def test_register_reports_state_and_family_membership():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ctl = DecayController(net, N=3)
    ts = channel_targets("l0", [(net[0].weight, 0), (net[0].bias, 0)])
    ctl.register(ts)
    assert all(ctl.status(t.key) == "registered" for t in ts)
    assert ctl.status(("l0", 99)) is None
    ctl.admit(ts[:1])
    assert ctl.status(("l0", 0)) == "decaying" and ctl.target(("l0", 0)) is ts[0]
    assert ctl.candidates_excluded() == {("l0", 0)}
    with pytest.raises(ValueError, match="appears twice"):
        ctl.register([ts[1], ts[1]])
    with pytest.raises(ValueError, match="cannot change"):
        ctl.register([Target(("l0", 0), "l0", (Slice(net[0].weight, 0, (0,)), Slice(net[0].bias, 0, (1,))))])


def test_slice_indices_must_be_integers():
    import numpy as np

    w = nn.Parameter(torch.zeros(4, 3))
    # Integers of every common kind are accepted.
    assert Slice(w, 0, (np.int64(2), torch.tensor(0), 3)).indices == (2, 0, 3)
    assert Slice(w, 0, np.array([1, 2])).indices == (1, 2)
    assert Slice(w, 0, torch.tensor([3], dtype=torch.int32)).indices == (3,)
    # A float or a bool is not an index: refused with one line that names the fix, never rounded.
    for bad in [
        (1.7,),
        1.7,
        (True,),
        True,
        (0, False),
        torch.tensor([1.0, 2.0]),
        np.array([1.5]),
        (np.bool_(True),),
        (torch.tensor(1.0),),
    ]:
        with pytest.raises(TypeError, match="pass integer indices") as e:
            Slice(w, 0, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="dim must be an integer"):
        Slice(w, 0.5, (0,))
    with pytest.raises(TypeError, match="dim must be an integer"):
        Slice(w, True, (0,))


def test_slice_accepts_a_bool_tensor_mask_of_the_dimensions_length():
    w = nn.Parameter(torch.zeros(4, 3))
    assert Slice(w, 0, torch.tensor([False, True, False, True])).indices == (1, 3)
    assert Slice(w, 1, torch.tensor([True, False, False])).indices == (0,)
    with pytest.raises(ValueError, match="length 4"):
        Slice(w, 0, torch.tensor([True, False]))  # wrong length: not silently taken as indices
    with pytest.raises(ValueError, match="selects nothing"):
        Slice(w, 0, torch.zeros(4, dtype=torch.bool))
    # A python list of bools is ambiguous (indices 1/0, or a mask?): refused, saying what to pass.
    with pytest.raises(TypeError, match="bool tensor") as e:
        Slice(w, 0, [False, True, False, True])
    assert "\n" not in str(e.value)
