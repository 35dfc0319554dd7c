"""The package's layers (README, "Development"): every import of a cnnkit module, eager or
inside a function, goes to an earlier layer or within its own."""

from __future__ import annotations

import ast
from pathlib import Path

import cnnkit

SRC = Path(cnnkit.__file__).parent

LAYERS = [
    {"_version", "errors", "config", "files", "threads", "console", "extras"},
    {"data", "models"},
    {"runtime", "model_io", "plots"},
    {"inspection", "inference", "training", "evaluation"},
    {"reporting", "export"},
    {"serve", "workflow", "demo"},
    {"cli", "__init__", "__main__"},
]
# Within a layer, imports that would make a cycle or a needless tie: (importer, imported).
FORBIDDEN = {
    ("data", "models"),  # models use data (its cache folder, its facts), not the reverse
    ("inference", "training"),  # predicting never needs the training code
    ("inference", "evaluation"),
    ("training", "evaluation"),  # training validates with its own loop
    ("export", "reporting"),
    ("reporting", "export"),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every cnnkit import in the package."""
    found = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        unit = _unit(".".join(rel.parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "cnnkit":
                    names = [f"cnnkit.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("cnnkit.") and _unit(name) != unit:
                    found.add((unit, _unit(name), str(path.relative_to(SRC))))
    return found


def _layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def test_every_module_has_a_layer() -> None:
    units = {_unit(f"cnnkit.{p.relative_to(SRC).parts[0]}".removesuffix(".py")) for p in
             SRC.glob("*") if p.suffix == ".py" or (p / "__init__.py").is_file()}  # fmt: skip
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_imports_point_to_earlier_layers() -> None:
    upward = sorted(
        f"{file}: {unit} imports {target}"
        for unit, target, file in _imports()
        if _layer(target) > _layer(unit) or (unit, target) in FORBIDDEN
    )
    assert upward == []
