"""The CPU controller's fast path: grouped row sums (one op per shape group instead of one per
tensor), from concatenations or from packed parameters (dpm.core.packing), on NCHW and
channels_last weights. Packing moves the targets' parameters into one buffer per row shape; the
model, optimizer and checkpoints must not see a difference, and a run must be bit for bit the run
without it, including after something replaced a parameter's storage. DPM's invariants 1-3 on the
fast path: test_core_decay.py."""

import io

import pytest
import torch
from torch import nn

from dpm.core import DecayController, RectifyConfig, channel_targets, segments
from dpm.core.packing import RowPack
from dpm.models import build_model
from helpers import bitwise_equal, one_thread  # noqa: F401  (one_thread is an autouse fixture)


def conv_bn_targets(net: nn.Module) -> list:
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = []
    for (name, conv), bn in zip(convs, bns):
        targets += channel_targets(name, [(conv.weight, 0), (bn.weight, 0), (bn.bias, 0)])
    return targets


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def run(pack_rows: bool, channels_last: bool, replace_at: int | None = None):
    """A ResNet-20 SR run with releases and prunings (a second admission at step 3); at step
    ``replace_at`` every parameter's storage is replaced by a copy (what ``model.to(...)`` or
    ``load_state_dict(assign=True)`` do)."""
    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctl = DecayController(net, N=5, optimizer=opt, rectify=RectifyConfig(t_rate=0.0, t_len=1.2), pack_rows=pack_rows)
    targets = conv_bn_targets(net)
    ctl.register(targets)
    ctl.admit(targets[::3])
    g = torch.Generator().manual_seed(2)
    for step in range(8):
        if step == 3:
            ctl.admit(targets[1::6])
        if step == replace_at:
            with torch.no_grad():
                for p in net.parameters():
                    p.data = p.data.clone(memory_format=torch.preserve_format)
        x = torch.randn(4, 3, 16, 16, generator=g)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), torch.randint(0, 10, (4,), generator=g)).backward()
        ctl.step(opt)
    return net, opt, ctl


def assert_same_run(a, b) -> None:
    (n0, o0, c0), (n1, o1, c1) = a, b
    assert c0.counts() == c1.counts() and c0.pruned and c0.released  # both outcomes exercised
    assert c0.pruned == c1.pruned and c0.released == c1.released
    assert c0.log.history == c1.log.history and c0.log.releases == c1.log.releases
    for (name, x), y in zip(n0.state_dict().items(), n1.state_dict().values()):
        assert bitwise_equal(x, y) if x.is_floating_point() else torch.equal(x, y), name
    for p0, p1 in zip(n0.parameters(), n1.parameters()):
        assert bitwise_equal(o0.state[p0]["momentum_buffer"], o1.state[p1]["momentum_buffer"])


@pytest.mark.parametrize("packed", [False, True], ids=["concatenated", "packed"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_row_sums_equal_the_per_tensor_path_bit_for_bit(channels_last, packed, monkeypatch):
    """The CPU controller's grouped row sums (one op per shape group) against one op per tensor:
    the same weights, logs and releases, to the bit, over a SR run with releases and prunings
    (channels_last rows are summed in memory order on both paths)."""
    monkeypatch.setattr(segments, "ROW_GROUPS_ON_CPU", False)
    per_tensor = run(packed, channels_last)
    monkeypatch.setattr(segments, "ROW_GROUPS_ON_CPU", True)
    grouped = run(packed, channels_last)
    ctl = grouped[2]
    if packed:
        assert ctl._decays.plan._packed and ctl._decays.plan._packed[1], "the packed path did not run"
        assert ctl._families.plan._packed and ctl._families.plan._packed[1], "the packed SR sums did not run"
    else:
        assert ctl._decays.plan._rows, "the grouped path did not run"
    assert_same_run(per_tensor, grouped)


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_parameters_keep_objects_values_and_layout(channels_last):
    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    keep = torch.preserve_format
    before = {n: (p, p.detach().clone(memory_format=keep), p.stride()) for n, p in net.named_parameters()}
    ctl = DecayController(net, N=4)
    targets = conv_bn_targets(net)
    ctl.register(targets)
    ctl.admit(targets[:1])
    ctl.after_step()  # the first decay step packs
    for name, p in net.named_parameters():
        obj, value, stride = before[name]
        assert p is obj and p.stride() == stride, name
        if name not in ("conv1.weight", "bn1.weight", "bn1.bias"):  # the decaying target moved
            assert bitwise_equal(p.detach(), value), name
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    same_shape = [c.weight for c in convs if c.weight.shape == convs[2].weight.shape]
    assert len(same_shape) > 2 and len({storage(w) for w in same_shape}) == 1, "one buffer per row shape"
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len({storage(t) for bn in bns for t in (bn.weight, bn.bias)}) == 1
    assert storage(net.fc.weight) not in {storage(w) for w in same_shape}, "only the targets' parameters"


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_run_equals_the_unpacked_run_bit_for_bit(channels_last):
    packed, plain = run(True, channels_last), run(False, channels_last)
    assert storage(packed[0].layer1[0].conv1.weight) == storage(packed[0].layer1[1].conv1.weight)
    assert storage(plain[0].layer1[0].conv1.weight) != storage(plain[0].layer1[1].conv1.weight)
    assert_same_run(packed, plain)


def test_replaced_storage_is_packed_again():
    """Something replaced every parameter's storage mid-run: the controller notices, packs again
    (the values unchanged) and the run stays the unpacked run."""
    packed, plain = run(True, True, replace_at=5), run(False, True, replace_at=5)
    net = packed[0]
    assert storage(net.layer1[0].conv1.weight) == storage(net.layer1[1].conv1.weight), "not packed again"
    assert_same_run(packed, plain)


def test_checkpoint_of_a_packed_model_loads_anywhere():
    net, _, _ = run(True, True)
    unpacked_bytes = io.BytesIO()
    torch.save({n: t.clone() for n, t in net.state_dict().items()}, unpacked_bytes)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    # The buffers hold exactly the packed parameters: a checkpoint is no bigger than without packing.
    assert len(buf.getvalue()) <= len(unpacked_bytes.getvalue()) * 1.01
    buf.seek(0)
    fresh = build_model("resnet20", num_classes=10)
    fresh.load_state_dict(torch.load(buf))
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # Loading into the packed model copies into its buffers: still packed.
    w = net.layer1[0].conv1.weight
    ptr = w.data_ptr()
    net.load_state_dict(fresh.state_dict())
    assert w.data_ptr() == ptr


def test_pack_rows_false_and_shared_storage_are_left_alone():
    net, _, _ = run(False, True)
    assert len({storage(p) for p in net.parameters()}) == len(list(net.parameters()))
    # A parameter tied to another tensor through its storage would be untied by a copy: skipped.
    a = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4, 3))
    base = torch.randn(8, 3)
    tied = nn.Parameter(base[:4])
    pack = RowPack([a, b, tied], [0, 1, 2])
    assert storage(a) == storage(b) and tied.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert pack.positions == {0, 1}


@pytest.mark.parametrize("packed", [False, True], ids=["concatenated", "packed"])
def test_a_default_device_set_by_the_user_does_not_leak_into_the_controller(packed, monkeypatch):
    """A user's `torch.set_default_device(...)` (common on GPU hosts) must not move the controller's
    own bookkeeping: every tensor it makes lives on its parameters' device. Here the default is
    `meta` while the model stays on the CPU (a stand-in for `cuda` that a CPU-only host can run):
    a tensor made without an explicit device would be meta and fail to mix with the CPU ones, or
    change the run. The run must be the plain run, bit for bit."""

    def under_meta(method):
        def call(*args, **kwargs):
            with torch.device("meta"):
                return method(*args, **kwargs)

        return call

    plain = run(pack_rows=packed, channels_last=False)
    for name, method in vars(DecayController).items():
        if not name.startswith("_") and callable(method):
            monkeypatch.setattr(DecayController, name, under_meta(method))
    assert_same_run(plain, run(pack_rows=packed, channels_last=False))
