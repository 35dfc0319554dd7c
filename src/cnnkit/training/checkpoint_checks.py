"""What a training state must hold to be resumed from: checked before it is used.

``torch.load(weights_only=True)`` runs no code, but it returns whatever containers and values
the file holds. Resuming reads the state field by field, so a field that is missing, unknown
or of another type would fail there, with a traceback and without falling back to the
previous checkpoint. ``state_problem`` checks the whole shape first; ``load_checkpoint``
turns its answer into a ``CheckpointError``, which the fallback handles.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints

import torch

from cnnkit.training.progress import FlatProgress, Progress, is_flat

__all__ = ["state_problem"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_tensor(v: Any, dtype: torch.dtype | None = None, numel: int | None = None) -> bool:
    return (
        isinstance(v, torch.Tensor)
        and (dtype is None or v.dtype == dtype)
        and (numel is None or v.numel() == numel)
    )


def _is_history(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(row, dict)
        and _is_int(row.get("epoch"))
        and all(isinstance(k, str) and _is_number(x) for k, x in row.items())
        for row in v
    )


_PROGRESS_TYPES = {  # the annotations of Progress's fields -> how to check a value
    "int": lambda v: _is_int(v) and v >= 0,
    "float": _is_number,
    "float | None": lambda v: v is None or _is_number(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list[dict[str, float]]": _is_history,
}


def _fields_problem(v: Any, kind: type, name: str) -> str | None:
    """Why ``v`` cannot be the fields of the dataclass ``kind`` (None if it can): each key
    one of its fields, each value of the field's type; a group (``Progress.best``) checked
    the same way. Missing fields take their defaults."""
    if not isinstance(v, dict):
        return f"{name} is not a mapping"
    groups = get_type_hints(kind)
    known = {f.name: f.type for f in fields(kind)}
    for key, value in v.items():
        if key not in known:
            return f"unknown {name} field {key!r}"
        if is_dataclass(groups[key]):
            problem = _fields_problem(value, groups[key], f"{name}.{key}")
            if problem:
                return problem
        elif not _PROGRESS_TYPES[str(known[key])](value):
            return f"{name}.{key} is {type(value).__name__} {value!r:.40}"
    return None


def _progress_problem(v: Any) -> str | None:
    if isinstance(v, dict) and is_flat(v):  # written before Progress had groups
        return _fields_problem(v, FlatProgress, "progress")
    return _fields_problem(v, Progress, "progress")


def _optimizer_problem(v: Any) -> str | None:
    groups = v.get("param_groups") if isinstance(v, dict) else None
    if (
        not isinstance(v, dict)
        or not isinstance(v.get("kind"), str)
        or not isinstance(groups, list)
    ):
        return "optimizer is not cnnkit's (kind, param_groups, state)"
    for g in groups:
        if not (
            isinstance(g, dict)
            and _is_number(g.get("lr"))
            and _is_number(g.get("weight_decay"))
            and _is_int(g.get("size"))
        ):
            return "optimizer.param_groups: expected lr, weight_decay and size in each"
    state, count = v.get("state"), sum(g["size"] for g in groups)
    if not isinstance(state, dict) or not all(
        _is_int(k)
        and 0 <= k < count
        and isinstance(s, dict)
        and all(isinstance(n, str) and (_is_tensor(x) or _is_number(x)) for n, x in s.items())
        for k, s in state.items()
    ):
        return "optimizer.state: expected tensors and numbers per parameter"
    return None


def _rng_problem(v: Any) -> str | None:
    if not isinstance(v, dict) or set(v) - {"torch", "numpy", "python", "cuda"}:
        return "rng: expected torch, numpy and python states"
    numpy_state, python_state = v.get("numpy"), v.get("python")
    good = (
        _is_tensor(v.get("torch"), torch.uint8, torch.get_rng_state().numel())
        and isinstance(numpy_state, list | tuple)
        and len(numpy_state) == 5
        and numpy_state[0] == "MT19937"
        and _is_tensor(numpy_state[1], torch.int64, 624)
        and _is_int(numpy_state[2])
        and _is_int(numpy_state[3])
        and _is_number(numpy_state[4])
        and isinstance(python_state, list | tuple)
        and len(python_state) == 3
        and _is_int(python_state[0])
        and isinstance(python_state[1], list | tuple)
        and len(python_state[1]) == 625
        and all(_is_int(x) for x in python_state[1])
        and (python_state[2] is None or _is_number(python_state[2]))
        and (
            "cuda" not in v
            or (isinstance(v["cuda"], list) and all(_is_tensor(x, torch.uint8) for x in v["cuda"]))
        )
    )
    return None if good else "rng: a random state is damaged"


def state_problem(state: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> str | None:
    """Why ``state`` is not a training state as ``save_checkpoint`` writes it (None if it is):
    the ``required`` and ``optional`` fields and no other, ``progress`` as ``Progress`` holds
    it (or the flat ``FlatProgress`` of older checkpoints), every other field as the training
    loop writes it."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a mapping"
    missing = [k for k in required if k not in state]
    if missing:
        return f"no {missing[0]!r}"
    unknown = sorted(str(k) for k in state if k not in required + optional)
    if unknown:
        return f"unknown field {unknown[0]!r}"
    scheduler, fingerprint, ema = state["scheduler"], state["fingerprint"], state.get("ema", {})
    for problem in (
        _progress_problem(state["progress"]),
        _optimizer_problem(state["optimizer"]),
        _rng_problem(state["rng"]),
    ):
        if problem:
            return problem
    if not (
        isinstance(scheduler, dict)
        and _is_int(scheduler.get("steps"))
        and isinstance(scheduler.get("base_lrs"), list)
        and all(_is_number(x) for x in scheduler["base_lrs"])
    ):
        return "scheduler: expected steps and base_lrs"
    if not _is_int(state["total_steps"]) or state["total_steps"] < 0:
        return "total_steps: expected a count"
    if not (
        isinstance(fingerprint, dict)
        and isinstance(fingerprint.get("settings", {}), dict)
        and isinstance(fingerprint.get("classes", []), list)
        and isinstance(fingerprint.get("images", [0, 0]), list)
        and len(fingerprint.get("images", [0, 0])) == 2
    ):
        return "fingerprint: expected data, classes, images and settings"
    if not isinstance(ema, dict) or not all(
        isinstance(k, str) and _is_tensor(x) for k, x in ema.items()
    ):
        return "ema: expected tensors by name"
    return None
