"""Fine-tuning in two phases, as fastai's ``fine_tune`` does it.

A network that starts from pretrained weights gets a new classification layer, random and
far from fitting, while its backbone already computes useful features. Training everything
at once at the usual learning rate lets the random head's large gradients pull the backbone
away from what it learnt. So, when ``train.freeze_epochs`` is set:

1. **head** (epochs 1 to ``freeze_epochs``): the backbone (every layer up to its global
   pooling, "the feature layer") is frozen, batchnorm in eval mode, and only the layers
   after it train. Their input never changes, so it is computed once per image and cached
   (``training.features``): a head epoch costs a few small matrix products.
2. **full** (the epochs after): every layer trains, the backbone at
   ``lr * train.backbone_lr_factor`` (discriminative learning rates: early layers hold the
   most general features and move least); with ``train.freeze_bn`` batchnorm keeps the
   weights' statistics (eval mode), as Keras advises for small data sets.

Each phase has its own learning-rate schedule (warm-up and decay within the phase). The run
keeps the weights of the epoch with the best validation accuracy over both phases, so a
full phase that does not help costs time, never accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.models.network import Network
from cnnkit.training.optim import Optimizer, Schedule, constant, cosine, linear, one_cycle

__all__ = ["Phases", "make_optimizer", "make_schedule", "set_mode", "set_trainable"]

log = logging.getLogger("cnnkit")


@dataclass(frozen=True)
class Phases:
    """Which epochs train what. ``head_epochs`` 0: every epoch trains the whole network."""

    epochs: int
    head_epochs: int
    feature_index: int  # ``model.infos`` index of the feature layer (the pooling)
    backbone_lr_factor: float
    freeze_bn: bool

    @classmethod
    def plan(cls, cfg: TrainConfig, model: Network) -> Phases:
        head_epochs = min(cfg.freeze_epochs, cfg.epochs)
        if head_epochs and cfg.weights is None:
            log.info("train.freeze_epochs=%d ignored: no weights to freeze", cfg.freeze_epochs)
            head_epochs = 0
        return cls(cfg.epochs, head_epochs, model.head_start, cfg.backbone_lr_factor, cfg.freeze_bn)

    def head_only(self, epoch: int) -> bool:
        return epoch <= self.head_epochs

    def first_of_phase(self, epoch: int) -> bool:
        return epoch in (1, self.head_epochs + 1)

    def describe(self, epoch: int, model: Network) -> str:
        """The line a run logs where a phase starts (or resumes)."""
        layer = model.infos[self.feature_index].name
        if self.head_only(epoch):
            head = ", ".join(i.name for i in model.infos[self.feature_index + 1 :])
            return (
                f"epochs {epoch}-{self.head_epochs} of {self.epochs}: the head ({head}) alone "
                f"on the frozen backbone (up to {layer}), from cached features"
            )
        if not self.head_epochs and self.backbone_lr_factor == 1.0 and not self.freeze_bn:
            return ""
        how = f"the backbone at {self.backbone_lr_factor:g}x the learning rate"
        bn = ", batchnorm statistics kept" if self.freeze_bn else ""
        return f"epochs {epoch}-{self.epochs} of {self.epochs}: the whole network, {how}{bn}"


def head_modules(model: Network, phases: Phases) -> list[nn.Module]:
    """The layers after the feature layer (the head)."""
    return [model.layers[i.name] for i in model.infos[phases.feature_index + 1 :]]


def head_parameters(model: Network, phases: Phases) -> list[nn.Parameter]:
    return [p for module in head_modules(model, phases) for p in module.parameters()]


def make_optimizer(model: Network, cfg: TrainConfig, phases: Phases) -> Optimizer:
    """The run's optimizer over every parameter: no weight decay on biases and batchnorm
    (1-D tensors); with muon the convolution filters (4-D) take Muon steps at ``muon_lr``;
    with a ``backbone_lr_factor`` other than 1 the backbone's groups run at that fraction
    of the rates. Frozen phases leave parameters without gradients, which it skips."""
    muon = cfg.optimizer == "muon"
    head = {id(p) for p in head_parameters(model, phases)}
    split = phases.backbone_lr_factor != 1.0
    parts = [[p for p in model.parameters() if id(p) in head or not split]]
    if split:
        parts.append([p for p in model.parameters() if id(p) not in head])
    groups = []
    for part, factor in zip(parts, (1.0, phases.backbone_lr_factor), strict=False):
        filters = [p for p in part if muon and p.ndim == 4 and p.requires_grad]
        taken = {id(p) for p in filters}
        decay = [p for p in part if p.ndim > 1 and id(p) not in taken]
        no_decay = [p for p in part if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr * factor},
            {"params": no_decay, "lr": cfg.lr * factor},
        ]
        if filters:
            groups.append({"params": filters, "lr": cfg.muon_lr * factor, "muon": True})
    return Optimizer(groups, cfg.optimizer, cfg.lr, betas=(0.9, 0.99), momentum=cfg.momentum)


def make_schedule(opt: Optimizer, cfg: TrainConfig, steps: int, phases: Phases) -> Schedule:
    """``cfg.schedule`` over the steps of each phase: the full phase starts its own
    warm-up and decay where the head phase ends."""
    shape = {"onecycle": one_cycle, "cosine": cosine, "linear": linear}.get(cfg.schedule)
    if shape is None:
        return Schedule(opt, constant)
    first, rest = phases.head_epochs * steps, (phases.epochs - phases.head_epochs) * steps
    if not first or not rest:
        return Schedule(opt, shape(first + rest))
    head, full = shape(first), shape(rest)
    return Schedule(opt, lambda step: head(step) if step < first else full(step - first))


def set_trainable(model: Network, phases: Phases, epoch: int) -> None:
    """Freeze the backbone for a head epoch (no gradients; under DDP only the head is then
    synchronised), unfreeze it for a full one (batchnorm's gain as built: ``scale: false``
    keeps it fixed)."""
    trainable = not phases.head_only(epoch)
    head = {id(p) for p in head_parameters(model, phases)}
    for info in model.infos:
        for name, p in model.layers[info.name].named_parameters():
            if id(p) in head:
                continue
            fixed = info.spec.type == "batchnorm" and not info.spec.params.get("scale", True)
            p.requires_grad_(trainable and not (fixed and name == "weight"))


def set_mode(model: Network, phases: Phases, epoch: int) -> None:
    """Train mode for the layers that train this epoch; batchnorm in eval mode where its
    statistics stay fixed (a frozen backbone, or ``freeze_bn``)."""
    model.train()
    if phases.head_only(epoch) or phases.freeze_bn:
        head = {id(m) for module in head_modules(model, phases) for m in module.modules()}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head:
                m.eval()
