"""A run's settings, settled in one place before it starts: ``plan_run``.

Each setting comes from the first that gives it: the overrides (``cnnkit train``'s flags,
``cnnkit.train``'s keyword arguments), the config file, the model's recommended settings,
cnnkit's defaults. Then ``settle`` works out what follows from them, once: model ``auto``
chosen from the data, the model's layers parsed, the starting weights checked (nothing read
or downloaded), the input size and channels those weights expect, the model's own input
size where none is given, the data folder made absolute (the run directory works from
anywhere). Training reads the plan and changes nothing in it but two facts only the run can
learn: the channels of ``channels: auto`` data (every image must be decoded to know) and
the sha256 of the weights it read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.config import Overrides, RunConfig, load_yaml
from cnnkit.data.folder import absolute
from cnnkit.errors import ConfigError
from cnnkit.models.registry import (
    AUTO,
    RECOMMENDABLE,
    ModelSpec,
    choose_model,
    list_presets,
    load_model_spec,
)
from cnnkit.models.weights import Pretrained, fit_config, plan_weights

__all__ = ["RunPlan", "plan_run", "settings", "settle"]

log = logging.getLogger("cnnkit")

DEFAULT_PRETRAINED = "efficientnet_lite0"  # its ImageNet weights install with cnnkit


@dataclass(frozen=True)
class RunPlan:
    """A run's settled settings, its model's layers and its starting weights (checked)."""

    config: RunConfig  # a named model, an input size, an absolute data folder
    spec: ModelSpec
    pretrained: Pretrained | None


def plan_run(
    overrides: Overrides | None = None,
    *,
    file: str | Path | Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
) -> RunPlan:
    """The plan of a new run (``overrides`` over the config ``file``, a path or its parsed
    mapping, over the model's recommended settings) or of the run directory ``resume``
    continues (``overrides`` over its ``config.yaml``)."""
    overrides = overrides or Overrides()
    if resume is not None:
        saved = Path(resume) / "config.yaml"
        base = RunConfig.from_dict(load_yaml(saved)) if saved.is_file() else RunConfig()
        return settle(overrides.apply(base))
    raw = load_yaml(file) if isinstance(file, str | Path) else file
    return settle(settings(raw, overrides))


def settle(config: RunConfig) -> RunPlan:
    """What follows from ``config``, worked out once (see the module's docstring). Settling
    a settled config changes nothing."""
    config = _choose_model(config)
    spec = load_model_spec(config.model)
    weights = config.train.weights
    pretrained = plan_weights(weights, spec) if weights else None
    config = fit_config(config, pretrained)  # the input size and channels the weights expect
    data = config.data
    data = dataclasses.replace(
        data,
        path=str(absolute(data.path)) if data.path else data.path,
        image_size=data.image_size or spec.input_size,
    )
    return RunPlan(dataclasses.replace(config, data=data), spec, pretrained)


def settings(raw: Mapping[str, Any] | None, overrides: Overrides) -> RunConfig:
    """The settings of a new run, each from the first that gives it: ``overrides``, the
    config file ``raw``, the model's recommended settings, cnnkit's defaults. Says which
    recommended settings it applied.

    Model ``auto`` (the default) is chosen first, from the data the settings name, so the
    chosen preset's recommended settings apply as if it had been named."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw or {})
    model = overrides.model or raw.get("model") or RunConfig().model
    chosen: RunConfig | None = None
    if model == AUTO:
        draft = overrides.apply(RunConfig.from_dict(raw))
        chosen = _choose_model(dataclasses.replace(draft, model=AUTO))
        model = chosen.model
        overrides = dataclasses.replace(overrides, model=model)
        raw["model"] = model
    defaults = None
    train_raw = raw.get("train") if isinstance(raw.get("train"), Mapping) else {}
    from_weights = bool(overrides.train.get("weights") or train_raw.get("weights"))
    if isinstance(model, str):  # (anything else: from_dict below says what is wrong)
        spec = load_model_spec(model)
        defaults = RunConfig.from_dict({"model": model, **spec.settings(from_weights)})
        given = {f"{sec}.{k}" for sec in RECOMMENDABLE for k in (raw.get(sec) or {})}
        applied = spec.recommended_settings(
            skip=given | overrides.given(), from_weights=from_weights
        )
        if applied:
            what = " for fine-tuning" if from_weights and spec.finetune else ""
            log.info("%s's recommended settings%s: %s", spec.name, what, ", ".join(applied))
    config = overrides.apply(RunConfig.from_dict(raw, defaults=defaults))
    if chosen is not None and config.data.image_size is None and not from_weights:
        data = dataclasses.replace(config.data, image_size=chosen.data.image_size)
        config = dataclasses.replace(config, data=data)
    return config


def _choose_model(config: RunConfig) -> RunConfig:
    """``config`` with model ``auto`` replaced by the preset and input size chosen from its
    data (logged in one line), or by the network its starting weights are for; any other
    model unchanged. Training settings are kept (``settings`` applies the chosen preset's
    recommended ones)."""
    if config.model != AUTO:
        return config
    if config.train.weights is not None:
        return _model_of_weights(config)
    from cnnkit.data.facts import measure_data

    if not config.data.path:
        raise ConfigError("model auto chooses from the data: data.path is required")
    facts = measure_data(config.data.path, config.data.val_split)
    choice = choose_model(facts, config.data.image_size, config.data.channels)
    log.info("%s", choice.describe())
    data = dataclasses.replace(config.data, image_size=choice.image_size)
    return dataclasses.replace(config, model=choice.model, data=data)


def _network_of_run(run: Path) -> str:
    """The model (preset name or layer file) a run directory was trained with."""
    try:
        if (run / "model.json").stat().st_size <= 16 << 20:
            name = json.loads((run / "model.json").read_text()).get("model_name")
            if name in list_presets():
                return str(name)
        if (run / "config.yaml").is_file():
            return RunConfig.from_dict(load_yaml(run / "config.yaml")).model
    except (OSError, ValueError, AttributeError, RecursionError, ConfigError) as exc:
        raise ConfigError(
            "{setting} {path}: cannot tell its network ({why})",
            setting="train.weights",
            path=run,
            why=exc,
        ) from None
    raise ConfigError(
        "{setting} {path}: cannot tell its network; name it with {model}",
        setting="train.weights",
        path=run,
    )


def _model_of_weights(config: RunConfig) -> RunConfig:
    """Model ``auto`` with starting weights: the network those weights are for (a run
    directory's own model; ``imagenet``: the backbone whose weights need no download); a
    file or URL must be told which network it fits."""
    weights = config.train.weights or ""
    run = Path(weights).expanduser()
    if (run / "model.json").is_file():
        model = _network_of_run(run)
        log.info("model auto: %s, the network of the run whose weights start this one", model)
    elif weights == "imagenet":
        model = DEFAULT_PRETRAINED
        log.info("model auto: %s, whose ImageNet weights come with cnnkit", model)
    elif weights.startswith(("http://", "https://")) or run.is_file():
        with_weights = [n for n in list_presets() if load_model_spec(n).pretrained]
        raise ConfigError(
            "{setting} {value}: say which network the weights are for with {model} "
            "(e.g. {presets})",
            setting="train.weights",
            value=weights,
            presets=", ".join(with_weights),
        )
    else:
        raise ConfigError(
            "{setting} {value}: not a file, URL, run directory or 'imagenet'",
            setting="train.weights",
            value=weights,
        )
    return dataclasses.replace(config, model=model)
