"""Adam, AdamW, SGD with Nesterov momentum and Muon, and the learning-rate schedules of the loop.

Why not ``torch.optim``: the first call into any of its optimizers imports ``torch._dynamo``,
which costs 1.5-2 s of start-up on a 2-core CPU, a fifth of a whole small run (MNIST to 99%
in about 10 s). These are the same update rules computed with the same ``torch._foreach_*``
kernels as ``torch.optim``'s foreach implementations; ``tests/training/test_optim.py`` checks them
step by step against ``torch.optim``.

Muon (Keller Jordan, 2024; the optimizer of the CIFAR-10 speed records since) steps each
convolution's filters along the orthogonalised Nesterov momentum: the momentum matrix
(filters x inputs*k*k) with its singular values pushed towards 1 by a quintic Newton-Schulz
iteration, so every direction of the update moves at the same rate. The filters are rescaled
to a fixed norm before each step (a batchnorm follows them, so only their direction matters).
Everything else (biases, batchnorm, dense layers) takes AdamW steps.

An optimizer's state is plain tensors and numbers (``state_dict``), so a checkpoint stays
loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cnnkit.errors import CheckpointError, ConfigError

__all__ = [
    "KINDS",
    "Optimizer",
    "Schedule",
    "constant",
    "cosine",
    "linear",
    "one_cycle",
    "orthogonalise",
]

KINDS = ("adam", "adamw", "sgd", "muon")
NEWTON_SCHULZ_STEPS = 3


class Optimizer:
    """``kind`` (adam, adamw, sgd or muon) over parameter groups with their own
    ``weight_decay`` (and, optionally, their own ``lr``).

    Adam and AdamW: ``betas`` and ``eps`` as in torch; Adam's decay is L2 added to the
    gradient, AdamW's is decoupled. SGD: Nesterov momentum ``momentum``, no dampening.
    Muon: groups marked ``"muon": True`` (convolution filters) take Muon steps with Nesterov
    momentum ``momentum``; the other groups take AdamW steps. Parameters without a gradient
    in a step are left alone, their state untouched.
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        kind: str,
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.9,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown optimizer {kind!r}, expected one of {', '.join(KINDS)}")
        self.kind, self.betas, self.eps, self.momentum = kind, betas, eps, momentum
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": list(g["params"]),
                "lr": g.get("lr", lr),
                "weight_decay": g.get("weight_decay", 0.0),
                "muon": bool(g.get("muon", False)),
            }
            for g in groups
        ]
        self.state: dict[int, dict[str, Any]] = {}  # by the parameter's position in all groups

    def _indexed(self) -> Iterable[tuple[dict[str, Any], list[tuple[int, torch.Tensor]]]]:
        i = 0
        for group in self.param_groups:
            params = list(enumerate(group["params"], start=i))
            i += len(params)
            yield group, [(k, p) for k, p in params if p.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group, indexed in self._indexed():
            if not indexed:
                continue
            keys = [k for k, _ in indexed]
            params = [p for _, p in indexed]
            grads = [p.grad for p in params]
            if self.kind == "sgd":
                self._sgd(group, keys, params, grads)
            elif group["muon"]:
                self._muon(group, keys, params, grads)
            else:
                self._adam(group, keys, params, grads)

    def _adam(self, group: dict, keys: list[int], params: list, grads: list) -> None:
        lr, decay = group["lr"], group["weight_decay"]
        beta1, beta2 = self.betas
        for k, p in zip(keys, params, strict=True):
            if k not in self.state:
                zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[k] = {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
            self.state[k]["step"] += 1
        states = [self.state[k] for k in keys]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if decay:
            if self.kind in ("adamw", "muon"):
                torch._foreach_mul_(params, 1 - lr * decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_sizes = [-lr / (1 - beta1 ** s["step"]) for s in states]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)

    def _nesterov(self, keys: list[int], grads: list) -> list[torch.Tensor]:
        """Update each parameter's momentum buffer with its gradient (the first step starts
        it at the gradient, as torch does) and return the Nesterov look-ahead directions."""
        momentum = self.momentum
        fresh = [k not in self.state for k in keys]
        for k, g, new in zip(keys, grads, fresh, strict=True):
            if new:
                self.state[k] = {"step": 0, "momentum": g.detach().clone()}
            self.state[k]["step"] += 1
        old = [i for i, new in enumerate(fresh) if not new]
        if old:
            bufs = [self.state[keys[i]]["momentum"] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [grads[i] for i in old])
        bufs = [self.state[k]["momentum"] for k in keys]
        return torch._foreach_add(grads, bufs, alpha=momentum)

    def _sgd(self, group: dict, keys: list[int], params: list, grads: list) -> None:
        lr, decay = group["lr"], group["weight_decay"]
        grads = torch._foreach_add(grads, params, alpha=decay) if decay else list(grads)
        torch._foreach_add_(params, self._nesterov(keys, grads), alpha=-lr)

    def _muon(self, group: dict, keys: list[int], params: list, grads: list) -> None:
        lr = group["lr"]
        for p, direction in zip(params, self._nesterov(keys, list(grads)), strict=True):
            p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(1e-12))
            update = orthogonalise(direction.reshape(p.shape[0], -1)).view_as(p)
            p.add_(update.to(p.dtype), alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only (a ``weights_only`` checkpoint)."""
        return {
            "kind": self.kind,
            "param_groups": [
                {"lr": g["lr"], "weight_decay": g["weight_decay"], "size": len(g["params"])}
                for g in self.param_groups
            ],
            "state": {int(k): dict(v) for k, v in self.state.items()},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        sizes = [len(g["params"]) for g in self.param_groups]
        try:
            saved_sizes = [int(g["size"]) for g in saved["param_groups"]]
            kind, state = saved["kind"], saved["state"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"optimizer state is not cnnkit's: {exc}") from None
        if kind != self.kind or saved_sizes != sizes:
            raise CheckpointError(
                f"optimizer state is for {kind} over {saved_sizes} parameters, "
                f"not {self.kind} over {sizes}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for k, values in state.items():
            k = int(k)
            self.state[k] = {
                name: v.to(params[k].device) if isinstance(v, torch.Tensor) else v
                for name, v in values.items()
            }
        for group, old in zip(self.param_groups, saved["param_groups"], strict=True):
            group["lr"], group["weight_decay"] = old["lr"], old["weight_decay"]


def orthogonalise(g: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """``g`` (rows, cols) with its singular values moved towards 1 (to about 0.5-1.5):
    the quintic Newton-Schulz iteration of Muon, in bf16 (which it tolerates)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)  # the largest singular value is now at most 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).float()


def one_cycle(
    total_steps: int, warmup: float = 0.25, start: float = 0.1, end: float = 0.01
) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up from ``start`` to 1 over the first
    ``warmup`` of the steps, then cosine down to ``end``. Works for any number of steps,
    even one (torch's OneCycleLR divides by zero for very short runs)."""
    up = max(1, round(warmup * total_steps))
    down = max(1, total_steps - up)

    def factor(step: int) -> float:
        if step < up:
            return start + (1.0 - start) * step / up
        t = min(1.0, (step - up) / down)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def cosine(total_steps: int, end: float = 0.01) -> Callable[[int], float]:
    """Cosine from 1 down to ``end`` over ``total_steps``, then ``end``."""

    def factor(step: int) -> float:
        t = min(1.0, step / max(1, total_steps))
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def linear(total_steps: int) -> Callable[[int], float]:
    """Straight down from 1 to 0 over ``total_steps`` (the CIFAR-10 speed records' decay)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max(1, total_steps))

    return factor


def constant(_step: int) -> float:
    return 1.0


class Schedule:
    """Sets every group's learning rate to ``base_lr * factor(step)``; ``step()`` advances."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.steps = 0
        self._apply()

    def _apply(self) -> None:
        scale = self.factor(self.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def seek(self, step: int) -> None:
        """Jump to ``step`` (a resumed run whose planned length changed)."""
        self.steps = step
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.steps, self.base_lrs = int(saved["steps"]), [float(v) for v in saved["base_lrs"]]
        self._apply()
