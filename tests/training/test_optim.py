"""cnnkit's optimizers and schedules against torch.optim, step by step, and their state."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.training.optim import (
    Optimizer,
    Schedule,
    constant,
    cosine,
    linear,
    one_cycle,
    orthogonalise,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter: never updated, no state
    return model


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]


def _train(model: nn.Module, opt: object, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _torch_optimizer(kind: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, foreach=True)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=(0.9, 0.99), foreach=True)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_updates_match_torch_optim_step_by_step(kind: str) -> None:
    ours, ref = _model(), _model()
    opt = Optimizer(_groups(ours), kind, 0.01, betas=(0.9, 0.99), momentum=0.9)
    ref_opt = _torch_optimizer(kind, _groups(ref), 0.01)
    frozen = ours[0].bias.detach().clone()
    for step in range(12):
        _train(ours, opt, 1, step)
        _train(ref, ref_opt, 1, step)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[0].bias, frozen)
    assert 2 not in opt.state  # the frozen bias (first of the second group) has no state


def test_state_round_trip_continues_exactly_and_loads_weights_only() -> None:
    straight = _model()
    opt = Optimizer(_groups(straight), "adamw", 0.01)
    _train(straight, opt, 10)

    first = _model()
    opt1 = Optimizer(_groups(first), "adamw", 0.01)
    _train(first, opt1, 4)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt1.state_dict(), "model": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # no pickled code needed
    second = _model(seed=1)
    second.load_state_dict(saved["model"])
    opt2 = Optimizer(_groups(second), "adamw", 0.01)
    opt2.load_state_dict(saved["optimizer"])
    _train(second, opt2, 6, start=4)
    for a, b in zip(second.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_mismatched_or_foreign_state_is_a_checkpoint_error() -> None:
    model = _model()
    adam = Optimizer(_groups(model), "adam", 0.01)
    with pytest.raises(CheckpointError, match="for adam over \\[2, 4\\] parameters, not sgd"):
        Optimizer(_groups(model), "sgd", 0.01).load_state_dict(adam.state_dict())
    torch_state = torch.optim.Adam(model.parameters()).state_dict()
    with pytest.raises(CheckpointError, match="optimizer state is not cnnkit's"):
        adam.load_state_dict(torch_state)
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        Optimizer(_groups(model), "lamb", 0.01)


def test_one_cycle_matches_lambda_lr_and_cosine_matches_torch() -> None:
    steps = 40
    for factor, ref_factory in [
        (one_cycle(steps), lambda o: torch.optim.lr_scheduler.LambdaLR(o, one_cycle(steps))),
        (
            cosine(steps),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps, eta_min=0.02 / 100),
        ),
        (constant, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0)),
    ]:
        opt = Optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], "sgd", 0.02)
        sched = Schedule(opt, factor)
        ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
        ref = ref_factory(ref_opt)
        for _ in range(steps + 1):
            assert math.isclose(opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
            sched.step()


def test_one_cycle_shape_and_schedule_state() -> None:
    f = one_cycle(100)
    assert math.isclose(f(0), 0.1) and math.isclose(f(25), 1.0) and math.isclose(f(100), 0.01)
    assert max(f(s) for s in range(101)) == 1.0
    assert math.isclose(one_cycle(1)(0), 0.1) and math.isclose(one_cycle(1)(1), 1.0)
    opt = Optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], "adam", 1.0)
    sched = Schedule(opt, f)
    for _ in range(30):
        sched.step()
    again = Schedule(Optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], "adam", 1.0), f)
    again.load_state_dict(sched.state_dict())
    assert again.steps == 30 and again.optimizer.param_groups[0]["lr"] == f(30)
    again.seek(60)
    assert again.optimizer.param_groups[0]["lr"] == f(60)


def test_training_does_not_import_dynamo() -> None:
    """torch.optim's first use imports torch._dynamo (seconds of start-up); cnnkit's does not."""
    code = (
        "import sys, torch\n"
        "from cnnkit.training.optim import Optimizer, Schedule, one_cycle\n"
        "m = torch.nn.Linear(3, 2)\n"
        "o = Optimizer([{'params': m.parameters()}], 'adamw', 0.1)\n"
        "s = Schedule(o, one_cycle(5))\n"
        "m(torch.ones(1, 3)).sum().backward(); o.step(); s.step(); o.zero_grad()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (64, 576)])  # conv filter shapes
def test_orthogonalise_moves_every_singular_value_towards_one(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 50  # badly conditioned: one direction dominates the raw gradient
    before = torch.linalg.svdvals(g)
    after = torch.linalg.svdvals(orthogonalise(g))
    assert orthogonalise(g).shape == g.shape
    assert before.max() / before.min() > 20
    # Muon's quintic iteration trades exactness for speed: singular values land in about
    # 0.5-1.5 (Keller Jordan's note on it), not exactly at 1.
    assert after.min() > 0.3 and after.max() < 1.6


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    )


def _muon_groups(model: nn.Module) -> list[dict]:
    filters = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim < 4]
    return [{"params": rest, "weight_decay": 0.01}, {"params": filters, "lr": 0.1, "muon": True}]


def test_muon_steps_filters_along_orthogonalised_nesterov_momentum() -> None:
    model = _conv_model()
    opt = Optimizer(_muon_groups(model), "muon", 0.01, momentum=0.6)
    conv = model[3].weight
    buf = torch.zeros_like(conv)
    for step in range(3):
        _train_conv(model, opt, step, apply=False)  # gradients only
        before = conv.detach().clone()
        grad = conv.grad.clone()
        opt.step()
        buf = 0.6 * buf + grad
        direction = (grad + 0.6 * buf).reshape(8, -1)
        normalised = before * math.sqrt(8) / before.norm()
        update = (normalised - conv.detach()).reshape(8, -1) / 0.1
        torch.testing.assert_close(update, orthogonalise(direction), rtol=0, atol=1e-5)
        assert conv.detach().norm() == pytest.approx(math.sqrt(8), rel=0.2)


def _train_conv(model: nn.Module, opt: Optimizer, step: int, apply: bool = True) -> float:
    g = torch.Generator().manual_seed(step % 4)  # four fixed batches, cycled
    x = torch.randn(16, 3, 6, 6, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if apply:
        opt.step()
    return loss.item()


def test_muon_leaves_the_other_parameters_to_adamw() -> None:
    """Given the same gradients, the non-filter groups move exactly as cnnkit's AdamW moves
    them (which the first test checks against torch's)."""
    torch.manual_seed(0)
    rest = [torch.randn(5, 4), torch.randn(4)]
    filters = [torch.randn(4, 3, 3, 3)]
    ours = [nn.Parameter(t.clone()) for t in rest + filters]
    ref = [nn.Parameter(t.clone()) for t in rest]
    muon = Optimizer(
        [
            {"params": ours[:1], "weight_decay": 0.05},
            {"params": ours[1:2]},
            {"params": ours[2:], "lr": 0.1, "muon": True},
        ],
        "muon",
        0.01,
        betas=(0.9, 0.99),
    )
    adamw = Optimizer(
        [{"params": ref[:1], "weight_decay": 0.05}, {"params": ref[1:]}],
        "adamw",
        0.01,
        betas=(0.9, 0.99),
    )
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours, [*ref, None], strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            if b is not None:
                b.grad = a.grad.clone()
        muon.step()
        adamw.step()
        for a, b in zip(ours[:2], ref, strict=True):
            assert torch.equal(a, b)


def test_muon_trains_a_small_network_and_its_state_round_trips() -> None:
    model = _conv_model()
    opt = Optimizer(_muon_groups(model), "muon", 0.01, momentum=0.6)
    losses = [_train_conv(model, opt, step) for step in range(40)]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])

    straight = _conv_model()
    opt_s = Optimizer(_muon_groups(straight), "muon", 0.01, momentum=0.6)
    for step in range(8):
        _train_conv(straight, opt_s, step)
    first = _conv_model()
    opt1 = Optimizer(_muon_groups(first), "muon", 0.01, momentum=0.6)
    for step in range(3):
        _train_conv(first, opt1, step)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt1.state_dict(), "model": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = _conv_model(seed=1)
    second.load_state_dict(saved["model"])
    opt2 = Optimizer(_muon_groups(second), "muon", 0.01, momentum=0.6)
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.param_groups[1]["lr"] == 0.1  # the filters' own step size came back too
    for step in range(3, 8):
        _train_conv(second, opt2, step)
    for a, b in zip(second.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_linear_schedule_falls_straight_to_zero() -> None:
    f = linear(10)
    assert [f(s) for s in (0, 5, 10, 12)] == [1.0, 0.5, 0.0, 0.0]
    assert linear(0)(0) == 1.0
