"""OTOv2 (DHSPG) on dependency groups: the spec's rules one by one, the DPM hook, removal, runs.

Independent re-computations follow docs/otov2-dhspg.md section 4; the parity with the
original package is tests/test_otov2_parity.py.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpm.checkpoint import load_checkpoint, load_pruned_model
from dpm.config import compose
from dpm.core import DecayController, RectifyConfig
from dpm.errors import UserError
from dpm.pruners.otov2 import DHSPG, remove_zero_groups, zero_invariant_groups
from helpers import one_thread  # noqa: F401  (autouse fixture)


def small_net(seed: int = 0) -> nn.Sequential:
    """conv(8)-BN, conv(12)-BN, a hidden Linear(10) and the classifier: three ZIGs, two types."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )


def build(seed: int = 0, controller_N: int | None = None, rectify: RectifyConfig | None = None, **kw):
    model = small_net(seed)
    zigs, pruner = zero_invariant_groups(model, torch.zeros(1, 3, 8, 8), num_classes=4)
    model.train()
    holder = {}
    ctl = None
    if controller_N is not None:
        ctl = DecayController(
            model,
            controller_N,
            rectify=rectify,
            track=100,
            replacement=(lambda r, e: holder["opt"].promote(r, e))
            if rectify is not None and rectify.budget == "strict"
            else None,
        )
        ctl.register(t for z in zigs for t in z.targets)
    opt = DHSPG(zigs, model.parameters(), controller=ctl, **kw)
    holder["opt"] = opt
    return model, zigs, pruner, opt, ctl


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def backward(model, batch):
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def matrices(zigs, grads=False):
    return [z.gather([p.grad if grads else p.detach() for p in z.params]).clone() for z in zigs]


def test_zigs_are_the_producer_rows_of_each_dependency_group():
    model, zigs, *_ = build()
    assert [z.num_groups for z in zigs] == [8, 12, 10]
    # Row width: conv weight in*k*k + bias + BN weight + BN bias; Linear in + bias.
    assert [m.shape[1] for m in matrices(zigs)] == [3 * 9 + 3, 8 * 9 + 3, 12 + 1]
    # Rows write back where they came from.
    z = zigs[1]
    m = matrices(zigs)[1]
    m[5] = 7.0
    z.scatter(m)
    assert bool((model[3].weight[5] == 7).all()) and float(model[4].bias[5]) == 7.0
    assert bool((model[3].weight[4] != 7).all())


@pytest.mark.parametrize("q", [1, 2, 3, 5])
def test_partition_sizes_follow_K_and_group_divisible(q):
    model, zigs, _, opt, _ = build(
        lr=0.1, lmbda=0.0, target_group_sparsity=0.4, tolerance_group_sparsity=0.15, group_divisible=q
    )
    backward(model, batches(1)[0])
    xs, ds = matrices(zigs), matrices(zigs, grads=True)
    opt.step()  # start_pruning_steps=0: the first step partitions
    # Independent re-computation of the scores (spec 4.3 b).
    cos = torch.cat([F.cosine_similarity(-x, -d, dim=1) for x, d in zip(xs, ds)])
    avg = torch.cat([x.norm(dim=1) / x.shape[1] for x in xs])
    score = 0.5 * cos / cos.norm() + 0.5 * (1 / (avg + 1e-6)) / (1 / (avg + 1e-6)).norm()
    total = sum(z.num_groups for z in zigs)
    K = int(total * min(0.4 + 0.15, 0.999))
    top = set(torch.topk(score, K).indices.tolist())
    start = 0
    for z, gp in zip(zigs, opt.penalized):
        C = z.num_groups
        rows = range(start, start + C)
        m = sum(1 for r in rows if r not in top)
        if C <= q:
            expected_np = C
        else:
            expected_np = min(max(round(m / q), 1) * q, C)
        assert int((~gp).sum()) == expected_np
        # G_np holds the lowest scores of the ZIG.
        zs = score[start : start + C]
        if 0 < expected_np < C:
            assert float(zs[~gp].max()) <= float(zs[gp].min())
        start += C


def _expected_lambdas(x, d, gp, lam, amp, hat):
    xn, dn, inner = x.norm(dim=1), d.norm(dim=1), (x * d).sum(1)
    out, mid = torch.full_like(xn, lam), torch.zeros_like(xn, dtype=torch.bool)
    for g in range(len(xn)):
        if gp[g] and inner[g] < 0:
            a = float(-inner[g] / xn[g])
            b = float(-(dn[g] ** 2) * xn[g] / inner[g])
            v = min(max(amp * a, lam), lam * hat)
            if v >= b:
                out[g], mid[g] = (a + b) / 2, True
            else:
                out[g] = v
    return out, mid


def test_lambda_adaptation_stays_within_its_clip_bounds_and_projection_zeroes_exactly_the_half_space_groups():
    lam, amp, hat, lr, eps = 1.0, 20.0, 10.0, 0.1, 0.9
    model, zigs, _, opt, _ = build(
        lr=lr,
        lmbda=lam,
        lmbda_amplify=amp,
        hat_lmbda_coeff=hat,
        epsilon=eps,
        target_group_sparsity=0.6,
        tolerance_group_sparsity=0.3,
    )
    projected = adapted = 0
    for step, batch in enumerate(batches(6)):
        backward(model, batch)
        xs, ds = matrices(zigs), matrices(zigs, grads=True)
        zero_before = [x.norm(dim=1) == 0 for x in xs]
        opt.step()
        for i, (z, x, d) in enumerate(zip(zigs, xs, ds)):
            gp = opt.penalized[i]
            if not gp.any():
                continue
            want, mid = _expected_lambdas(x, d, gp, lam, amp, hat)
            got = opt.last_lambdas[z.name]
            assert torch.allclose(got, want, rtol=1e-5, atol=0)
            clipped = ~mid
            assert bool(((got[clipped] >= lam) & (got[clipped] <= lam * hat * (1 + 1e-6))).all())
            adapted += int((got != lam).sum())
            # Half-space condition on the G_p rows, from the trial point after the lasso step.
            xn = x.norm(dim=1)
            hat_x = x - lr * d
            hat_x[gp] -= lr * want[gp].unsqueeze(1) * x[gp] / (xn[gp] + 1e-8).unsqueeze(1)
            cond = gp & ((hat_x * x).sum(1) < eps * xn**2) & (xn > 0)
            zero_after = z.gather(z.params).norm(dim=1) == 0
            assert torch.equal(zero_after, cond | zero_before[i]), f"step {step + 1}, ZIG {z.name}"
            projected += int(cond.sum())
    assert projected > 0 and adapted > 0  # the test exercised both rules
    assert opt.summary()["zero_groups"] < opt.summary()["num_groups"]


@pytest.mark.parametrize("variant,momentum", [("sgd", 0.9), ("adam", None), ("adamw", None)])
def test_fixed_zeros_stay_zero_under_momentum_and_weight_decay(variant, momentum):
    model, zigs, _, opt, _ = build(
        lr=0.05 if variant == "sgd" else 1e-3,
        variant=variant,
        first_momentum=momentum,
        weight_decay=5e-4 if variant == "sgd" else None,
        lmbda=0.0,
        start_pruning_steps=1000,
    )
    data = batches(8)
    for b in data[:3]:  # momentum buffers fill up first
        backward(model, b)
        opt.step()
    with torch.no_grad():
        m = zigs[1].gather(zigs[1].params)
        m[[2, 7]] = 0.0
        zigs[1].scatter(m)
    for b in data[3:]:
        backward(model, b)
        opt.step()
        assert opt.zero_groups()[1] == [2, 7]
        assert float(model[3].weight[[2, 7]].abs().sum() + model[4].weight[[2, 7]].abs().sum()) == 0.0


def test_sgd_before_pruning_is_torch_sgd_with_coupled_weight_decay():
    """2.0.16's heavy ball and coupled L2 are torch.optim.SGD's (no penalty before the partition)."""
    model, zigs, _, opt, _ = build(lr=0.1, first_momentum=0.9, weight_decay=5e-4, start_pruning_steps=100)
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for b in batches(4):
        lockstep_step(b, (model, opt), (twin, ref))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def lockstep_step(batch, *pairs) -> None:
    """One step of each (model, optimizer) pair on the same batch: backward for all, then the steps."""
    for model, _ in pairs:
        backward(model, batch)
    for _, opt in pairs:
        opt.step()


def run_steps(opt, model, data):
    for b in data:
        backward(model, b)
        opt.step()


# A DHSPG that prunes within a few steps of a tiny model (the controller tests below share it).
SMALL_DHSPG = dict(
    lr=0.1,
    lmbda=0.5,
    epsilon=0.9,
    first_momentum=0.9,
    weight_decay=5e-4,
    target_group_sparsity=0.5,
    tolerance_group_sparsity=0.3,
    start_pruning_steps=2,
)


def test_sp_with_N_1_is_the_base_method_bit_for_bit():
    kw = dict(SMALL_DHSPG)
    base_model, _, _, base, _ = build(**kw)
    sp_model, _, _, sp, _ = build(controller_N=1, **kw)
    for b in batches(10):
        lockstep_step(b, (base_model, base), (sp_model, sp))
        for p, q in zip(base_model.parameters(), sp_model.parameters()):
            assert torch.equal(p, q)
        assert base.group_sparsity == sp.group_sparsity
    assert base.summary()["zero_groups"] > 0


def test_sp_never_zeroes_abruptly_and_each_group_follows_the_linear_schedule():
    N = 4
    model, zigs, _, opt, ctl = build(
        controller_N=N,
        lr=0.1,
        lmbda=0.5,
        epsilon=0.9,
        target_group_sparsity=0.5,
        tolerance_group_sparsity=0.3,
        start_pruning_steps=1,
    )
    admitted_at: dict = {}
    first_norm: dict = {}
    for step, b in enumerate(batches(14)):
        backward(model, b)
        before = [n.clone() for n in opt.group_norms()]
        opt.step()
        after = opt.group_norms()
        for i, z in enumerate(zigs):
            for r, key in enumerate(z.keys):
                if key not in admitted_at and bool(opt.admitted[i][r]):
                    admitted_at[key] = step
                    first_norm[key] = float(after[i][r])
                went_zero = before[i][r] > 0 and after[i][r] == 0
                if key not in admitted_at:
                    assert not went_zero, f"{key} zeroed without a decay"
                    continue
                n = step - admitted_at[key] + 1  # decay steps applied
                L0 = first_norm[key] / (1 - 1 / N)
                if n >= N:
                    assert float(after[i][r]) == 0.0
                    assert bool((z.gather(z.params)[r] == 0).all())
                else:
                    assert not went_zero
                    assert float(after[i][r]) == pytest.approx(L0 * (1 - n / N), rel=1e-5)
    assert len(admitted_at) >= 3
    # Decaying groups count toward the target: sparsity counts them with the zeros.
    assert ctl.counts()["pruned"] == sum(len(r) for r in opt.zero_groups())


def test_sr_release_leaves_G_p_for_good_and_strict_promotes_the_best_scoring_group():
    rectify = RectifyConfig(t_rate=0.0, t_len=0.0, budget="strict")
    model, zigs, _, opt, ctl = build(
        controller_N=6,
        rectify=rectify,
        lr=0.1,
        lmbda=0.5,
        epsilon=0.9,
        target_group_sparsity=0.5,
        tolerance_group_sparsity=0.3,
        start_pruning_steps=1,
    )
    run_steps(opt, model, batches(12))
    released = [r["key"] for r in ctl.log.releases]
    assert released, "no release happened: the test exercises nothing"
    row_of = {k: (i, r) for i, z in enumerate(zigs) for r, k in enumerate(z.keys)}
    for key in released:
        i, r = row_of[key]
        assert not bool(opt.penalized[i][r])
        assert ctl.status(key) == "released"
    assert opt.promoted > 0
    assert ctl.log.readmissions == []  # a release is final: never projected / admitted again
    # promote() picks the best-scoring eligible G_np row (ZIGs keep >= q = 1 G_np rows).
    norms = opt.group_norms()
    best = max(
        (
            (float(opt.scores[i][r]), i, r)
            for i, z in enumerate(zigs)
            if int((~opt.penalized[i]).sum()) > 1
            for r in range(z.num_groups)
            if not opt.penalized[i][r] and not opt.admitted[i][r] and norms[i][r] > 0
        ),
        default=None,
    )
    assert best is not None
    opt.promote([None])
    assert bool(opt.penalized[best[1]][best[2]])


def test_base_budget_refills_G_p_only_as_far_as_the_target_needs():
    """Releases that would leave G_p smaller than the target's group count are made up by score
    (invariant 6); releases within the tolerance are not replaced."""
    rectify = RectifyConfig(t_rate=0.0, t_len=0.0, budget="base")
    for tolerance, refill in ((0.0, True), (0.3, False)):
        model, zigs, _, opt, ctl = build(
            controller_N=6,
            rectify=rectify,
            lr=0.1,
            lmbda=0.5,
            epsilon=0.9,
            target_group_sparsity=0.5,
            tolerance_group_sparsity=tolerance,
            start_pruning_steps=1,
        )
        need = math.ceil(0.5 * sum(z.num_groups for z in zigs))
        sizes = []
        original = opt._take_releases

        def spy(original=original, opt=opt):
            original()
            if opt.partitioned:
                sizes.append(sum(int(m.sum()) for m in opt.penalized))

        opt._take_releases = spy
        run_steps(opt, model, batches(12))
        assert ctl.log.releases, "no release happened: the test exercises nothing"
        if refill:
            assert 0 < opt.promoted <= len(ctl.log.releases) and min(sizes) >= need
        else:
            assert opt.promoted == 0 and min(sizes) >= need


def test_removal_keeps_the_outputs_and_the_final_sparsity_meets_the_target():
    target = 0.4
    model, zigs, pruner, opt, _ = build(
        lr=0.1,
        lmbda=1.0,
        epsilon=0.9,
        first_momentum=0.9,
        target_group_sparsity=target,
        tolerance_group_sparsity=0.3,
        start_pruning_steps=1,
    )
    run_steps(opt, model, batches(10))
    assert opt.group_sparsity >= target
    summary = opt.summary()
    assert summary["group_sparsity"] >= target
    params_before = sum(p.numel() for p in model.parameters())
    x = torch.randn(8, 3, 8, 8)
    model.eval()
    before = model(x).detach()
    result = remove_zero_groups(model, pruner, opt, [(x, None)])
    model.eval()
    assert result["removed_groups"] == summary["zero_groups"]
    assert float((model(x) - before).abs().max()) <= 1e-5
    assert result["removal_max_abs_diff"] <= 1e-5
    widths = [model[0].out_channels, model[3].out_channels, model[8].out_features]
    assert sum(widths) == summary["num_groups"] - summary["zero_groups"]
    assert model[3].in_channels == widths[0] and model[8].in_features == widths[1]  # consumers pruned too
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert model.training is False  # the mode set here is kept


def test_state_dict_resumes_to_the_same_trajectory():
    kw = dict(SMALL_DHSPG)
    data = batches(10)
    model, _, _, opt, ctl = build(controller_N=3, **kw)
    run_steps(opt, model, data[:5])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ctl": ctl.state_dict()})
    run_steps(opt, model, data[5:])
    model2, _, _, opt2, ctl2 = build(controller_N=3, seed=3, **kw)
    ctl2.load_state_dict(saved["ctl"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    run_steps(opt2, model2, data[5:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.summary() == opt2.summary()


# ---------------------------------------------------------------------------------------------- runs
def smoke(tmp_path, variant, *extra):
    from dpm.run import run

    cfg = compose(["experiment=otov2_smoke", f"dpm={variant}", *extra])
    return run(cfg, tmp_path / "_".join([variant, *extra]).replace("=", "-").replace(".", "-"))


def test_smoke_runs_of_base_sp_sr_complete(tmp_path):
    results = {v: smoke(tmp_path, v) for v in ("base", "sp", "sr")}
    for v, m in results.items():
        assert m["status"] == "complete", v
        assert m["zero_groups"] > 0 and m["removed_groups"] == m["zero_groups"]
        assert m["removal_max_abs_diff"] <= 1e-5
        assert m["pruned_params"] < m["base_params"] and m["speedup"] > 1
        assert m["epochs"] == {"pretrain": 0, "dhspg": 2, "finetune": 1}
        assert m["top1_at_pruning_start"] is not None and m["start_pruning_step"] == 2
        assert [r["epoch"] for r in m["dhspg_history"]] == [1, 2]
        assert m["top1_best_phase"] == "finetune"
        log = json.loads((tmp_path / v / "dpm_log.json").read_text())
        assert set(log) >= {"history", "releases", "trajectories"}
        assert load_checkpoint(tmp_path / v / "pruned_model.pt")["removed"] == m["removed_groups"]
        pruned = load_pruned_model(tmp_path / v / "pruned_model.pt")  # weights + structure, rebuilt
        assert isinstance(pruned, nn.Module)
        # Saved right after the removal (before fine-tuning): the pruned architecture.
        assert sum(q.numel() for q in pruned.parameters()) == m["pruned_params"]
    assert results["base"]["N"] == 1 and results["sp"]["N"] == 3
    assert results["base"]["group_sparsity"] >= 0.5 and results["base"]["target_met"]


def test_sp_N1_run_equals_the_base_run(tmp_path):
    base = smoke(tmp_path, "base")
    sp = smoke(tmp_path, "sp", "dpm.N=1")
    keys = ("zero_groups", "top1_final", "top1_after_dhspg", "pruned_macs", "pruned_params", "test_loss_final")
    assert {k: base[k] for k in keys} == {k: sp[k] for k in keys}


def test_paper_config_composes_with_the_otov2_recipe():
    cfg = compose(["experiment=paper/otov2_vgg16bn_cifar10", "dpm=sp"])
    p = cfg.pruner
    assert (cfg.model.name, cfg.model.classifier, cfg.dataset.name) == ("vgg16_bn", "mlp", "cifar10")
    assert (p.variant, p.lmbda, p.epsilon, p.target_group_sparsity, p.tolerance_group_sparsity) == (
        "sgd",
        5e-4,
        0.9,
        0.79,
        0.21,
    )
    assert (p.weight_decay, p.start_pruning_epochs) == (5e-4, 50)
    assert (p.train.epochs, p.train.milestones, p.train.batch_size, p.train.mixup) == (300, [75, 150, 225], 64, 0.2)
    assert cfg.trainer.pretrain.epochs == 0 and cfg.trainer.finetune.epochs == 0
    from dpm.config import validate

    validate(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("pruner.train.momentum=0.9", "pruner.train.momentum"),
        ("pruner.variant=rmsprop", "pruner.variant"),
        ("pruner.epsilon=1.5", "pruner.epsilon"),
        ("pruner.target_group_sparsity=1.0", "pruner.target_group_sparsity"),
    ],
)
def test_bad_otov2_settings_fail_with_the_key(override, key):
    from dpm.config import validate

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(compose(["experiment=otov2_smoke", override]))


@pytest.mark.slow
def test_killed_sr_run_resumes_to_the_same_result(tmp_path):
    """Killed mid-decay (end of DHSPG epoch 1) and again after the fine-tune's checkpoint, the run
    resumes to the uninterrupted run's metrics and pruned weights: DHSPG's state_dict (partition,
    momentum, admissions) and the controller's go into the phase checkpoint."""
    from conftest import run_cli

    args = ["experiment=otov2_smoke", "dpm=sr", "pruner.train.epochs=3", "dpm.N=4"]
    # Through the CLI like the killed runs: same thread count, so the same float summation order.
    ref = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = tmp_path / "killed"
    for fault in ("dhspg:epoch1", "finetune:epoch1"):
        proc = run_cli([*args, f"hydra.run.dir={killed}"], env={"DPM_FAULT_AT": fault})
        assert proc.returncode == -9, (fault, proc.stderr[-2000:])
    resumed = run_cli([*args, f"hydra.run.dir={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skip = {"wall_time_s", "run_dir", "history", "dhspg_history", "pruned_model"}
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert json.loads((tmp_path / "ref" / "dpm_log.json").read_text()) == json.loads(
        (killed / "dpm_log.json").read_text()
    )
    wa = load_pruned_model(tmp_path / "ref" / "pruned_model.pt").state_dict()
    wb = load_pruned_model(killed / "pruned_model.pt").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "name,options,widths",
    [
        # Spec section 5: OTOv2's per-channel group sizes (producers only: conv I*9 + bias + BN weight and bias).
        ("vgg16_bn", {"classifier": "mlp"}, {30, 579, 1155, 2307, 4611, 513}),
        # Block-internal 146 / 290 / 578; residual stages (stem/shortcut + 9 conv2 + 10 BN) 1343 / 2628 / 5236.
        ("resnet56", {"shortcut": "projection"}, {146, 290, 578, 1343, 2628, 5236}),
    ],
)
def test_group_vectors_of_the_paper_models_are_otov2s(name, options, widths):
    from dpm.models import build_model

    model = build_model(name, 10, 3, **options)
    zigs, _ = zero_invariant_groups(model, torch.zeros(1, 3, 32, 32), num_classes=10)
    assert model.training  # the graph build restored the mode
    assert {sum(p.numel() // z.num_groups for p in z.params) for z in zigs} == widths
    expected = (15, 4224 + 1024) if name == "vgg16_bn" else (30, 1120)
    assert (len(zigs), sum(z.num_groups for z in zigs)) == expected
