"""Time to accuracy: whole-process wall time of ``cnnkit train`` to a target, cold and warm.

Each run is ``.venv/bin/cnnkit train DATA --target-accuracy A --quiet ...`` as a child
process, timed from the fork to its exit (interpreter start-up, imports, decoding, training,
validation and saving all included). ``cold``: a fresh ``CNNKIT_CACHE_DIR``, so every image is
decoded; ``warm``: the same cache again (the operating system's file cache is warm in both).
Peak RSS is ``ru_maxrss`` of that child from ``os.wait4``. Validation accuracy and
``seconds_to_target`` (from the start of training) come from the run's ``summary.json``.

- shapes: cnnkit against the learning material's exercise recipe (``bench/peer.py``, plain
  PyTorch), both whole-process to 99% validation accuracy on the same 1,200 shapes drawn as
  the material draws them (``cnnkit data shapes --style material``: one dark upright shape
  on white, 128x128), validated on the same 240 images. cnnkit runs as a user types it:
  ``cnnkit train SHAPES --out RUN --target-accuracy 0.99`` (``--model auto``, the report
  written at the end), with a fresh decode cache (``cold``) and a filled one (``warm``);
  also ``no flags`` (warm, no target: it stops by itself) for what the bare command costs.
  The runs alternate, the order turning each round, ``--repeats`` rounds after one unkept
  round that fills the warm cache; the ratios are of the medians. Each cnnkit run also says
  where its time went (from its run directory: ``summary.json``'s ``wall_seconds`` for
  ``train()``, ``metrics.csv``'s epoch seconds, ``report.html``'s write time);
- mnist: 99.0% on the 10,000 test images (``test/``, which cnnkit validates on);
- cifar10: 94% on the 10,000 test images;
- mnist-default: ``cnnkit train MNIST`` with no flags at all (``--model auto``) against
  ``--model mnist``, alternating the same way, warm cache (medians); the goal is 99% test
  accuracy in at most 1.5x the wall time of ``--model mnist``.

The training settings of each data set are in ``RECIPES`` below. Usage::

    .venv/bin/python bench/time_to_accuracy.py [--dataset shapes|mnist|cifar10|mnist-default|all]
        [--repeats 3] [--quick]

On a machine shared with other work, run it under ``flock /work/wt/bench.lock`` (or your
own lock) so that benchmarks do not overlap; every run records the load average it met.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchlib import (
    BENCH_DIR,
    REPO,
    Contender,
    alternate,
    cnnkit_command,
    emit,
    fresh_dir,
    log,
    machine,
    median,
    run_child,
    shapes_folder,
    unpacked,
)

# ------------------------------------------------------------------------------- Setup


@dataclass(frozen=True)
class Recipe:
    """How cnnkit trains on one data set; ``flags`` are further ``cnnkit train`` options.

    A setting left as None is not passed: the model's recommended setting (or cnnkit's
    default) applies, as it does for a user who runs ``cnnkit train --model NAME``.
    """

    target: float  # validation (or test) accuracy to reach
    model: str | None  # a preset name or a YAML file of layers; None: no flag (auto)
    epochs: int | None = None  # at most; the run stops at the target
    batch_size: int | None = None
    lr: float | None = None
    image_size: int | None = None  # None: the model's own input size
    flags: tuple[str, ...] = ()


RECIPES = {
    # The mnist and cifar presets' recommended settings (`cnnkit model list`): one epoch for
    # MNIST; for CIFAR-10 Muon at batch 1000 for 7 epochs, which fit the 10 minutes here.
    "mnist": Recipe(0.99, "mnist"),
    "cifar10": Recipe(0.94, "cifar"),
}
# Data sets on which cnnkit's defaults (no flags) are compared with a named preset: the preset
# and the largest ratio of wall times the defaults may take.
DEFAULT_VS_PRESET = {"mnist-default": ("mnist", "mnist", 0.99, 1.5)}  # data, preset, target, ratio
# Data sets on which cnnkit's default command is compared with the peer: the target, and the
# least ratio of wall times (peer / cnnkit) the issue asks for.
VS_PEER = {"shapes": (0.99, 8.0)}
PEER = {"epochs": 60}  # the peer stops at the target, or after this many epochs
SHAPES_PER_CLASS = 400
SHAPES_STYLE = "material"  # drawn as the learning material draws them: the peer reaches 99%
QUICK = {"epochs": 1, "shapes_per_class": 20, "files_per_class": 30}

# -------------------------------------------------------------------------------- Data


def data_folder(name: str, quick: bool) -> Path:
    if name in DEFAULT_VS_PRESET:
        name = DEFAULT_VS_PRESET[name][0]
    if name == "shapes":
        count = QUICK["shapes_per_class"] if quick else SHAPES_PER_CLASS
        return shapes_folder(count, style=SHAPES_STYLE)
    return unpacked(name, QUICK["files_per_class"] if quick else None)


# ---------------------------------------------------------------------------- Training


def train_command(recipe: Recipe, data: Path, out: Path, epochs: int | None) -> list[str]:
    cmd = [*cnnkit_command(), "train", str(data), "--out", str(out), "--overwrite", "--quiet"]
    if recipe.model is not None:
        cmd += ["--model", recipe.model]
    cmd += ["--target-accuracy", str(recipe.target)]
    for flag, value in (("--epochs", epochs), ("--batch-size", recipe.batch_size)):
        if value is not None:
            cmd += [flag, str(value)]
    if recipe.lr is not None:
        cmd += ["--lr", str(recipe.lr)]
    if recipe.image_size:
        cmd += ["--image-size", str(recipe.image_size)]
    return [*cmd, *recipe.flags]


def run_cnnkit(name: str, recipe: Recipe, data: Path, quick: bool) -> dict[str, object]:
    """The cold run and the warm run of one data set."""
    cache = fresh_dir(BENCH_DIR / f"cache-tta-{name}")
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(cache)}
    epochs = QUICK["epochs"] if quick else recipe.epochs
    phases: dict[str, object] = {}
    for phase in ("cold", "warm"):
        out = BENCH_DIR / "runs-tta" / f"{name}-{phase}"
        output = BENCH_DIR / "runs-tta" / f"{name}-{phase}.log"
        output.parent.mkdir(parents=True, exist_ok=True)
        cmd = train_command(recipe, data, out, epochs)
        log(f"{name} {phase}: {' '.join(cmd)}")
        rc, wall, rss = run_child(cmd, env, output)
        if rc != 0:
            sys.stderr.write(output.read_text()[-3000:])
            raise SystemExit(f"error: cnnkit train exited with {rc} ({output})")
        summary = json.loads((out / "summary.json").read_text())
        phases[phase] = {
            "wall_seconds": round(wall, 2),
            "peak_rss_mb": round(rss, 1),
            "reached_target": summary["seconds_to_target"] is not None,
            "seconds_to_target": summary["seconds_to_target"],
            "best_val_acc": summary["best_val_acc"],
            "epochs_run": summary["epochs_run"],
            "images_per_second": summary["images_per_second"],
            "precision": summary.get("precision"),
        }
        log(f"{name} {phase}: {wall:.1f}s, {rss:.0f} MB, best {summary['best_val_acc']:.2%}")
    return {"command": " ".join(train_command(recipe, data, Path("RUN"), epochs)), **phases}


def read_cnnkit_run(out: Path) -> dict[str, object]:
    """Figures of a ``cnnkit train`` run and where its time went, from its run directory
    (every target compared here is 99%)."""
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        epochs = sum(float(row["seconds"]) for row in csv.DictReader(f))
    report = out / "report.html"
    written = (out / "summary.json").stat().st_mtime  # the end of train()
    return {
        "reached_target": summary["best_val_acc"] >= 0.99,
        "best_val_acc": summary["best_val_acc"],
        "epochs_run": summary["epochs_run"],
        "model": yaml.safe_load((out / "config.yaml").read_text())["model"],
        "threads": summary.get("threads"),
        "train_seconds": summary["wall_seconds"],  # train(): setup, data, epochs, saving
        "epochs_seconds": round(epochs, 2),  # the epochs alone: training and validation
        "report_seconds": round(report.stat().st_mtime - written, 2) if report.is_file() else None,
    }


def read_peer_run(out: Path) -> dict[str, object]:
    report = json.loads(out.read_text())
    keep = ("reached_target", "seconds_to_target", "startup_seconds", "images_per_second")
    return {
        "best_val_acc": max(report["val_acc"], default=0.0),
        "epochs_run": report["epochs"],
        "val_acc": report["val_acc"],
        **{k: report[k] for k in keep},
    }


def medians(rows: list[dict]) -> dict[str, object]:
    numbers = [
        k for k, v in rows[0].items() if type(v) in (int, float) and k not in ("load", "threads")
    ]
    figures = {k: median([r[k] for r in rows if r[k] is not None] or [0]) for k in numbers}
    return {**figures, "reached_target": all(r["reached_target"] for r in rows)}


def same_validation_images(data: Path, run_dir: Path) -> bool:
    """Whether the peer validates on the very images cnnkit's run did (its ``split.csv``)."""
    import peer  # bench/peer.py: the recipe itself never imports cnnkit

    _, _, val = peer.build_datasets(data)
    with open(run_dir / "split.csv", newline="") as f:
        ours = {row["path"] for row in csv.DictReader(f) if row["split"] == "val"}
    return ours == {str(Path(p).resolve()) for p in val.paths}


def run_vs_peer(name: str, data: Path, repeats: int, quick: bool) -> dict[str, object]:
    """cnnkit's default command (cold and warm cache, and with no flags) against the peer,
    both whole-process to the target on the same folder, alternating."""
    target, goal = VS_PEER[name]
    runs_dir = BENCH_DIR / "runs-tta"
    warm = fresh_dir(BENCH_DIR / f"cache-tta-{name}-warm")
    cold = BENCH_DIR / f"cache-tta-{name}-cold"
    epochs = ["--epochs", str(QUICK["epochs"])] if quick else []

    def cnnkit(label: str, flags: list[str], cache: Path) -> Contender:
        out = runs_dir / f"{name}-{label}"
        cmd = [*cnnkit_command(), "train", str(data), "--out", str(out), *flags, *epochs]
        env = {**os.environ, "CNNKIT_CACHE_DIR": str(cache)}
        return Contender(cmd, out, read_cnnkit_run, env, cache if cache == cold else None)

    to_target = ["--target-accuracy", str(target)]
    peer_cmd = [sys.executable, str(REPO / "bench/peer.py"), "--data", str(data), *to_target]
    peer_cmd += ["--epochs", str(QUICK["epochs"] if quick else PEER["epochs"])]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # what cnnkit picks on a busy machine
    contenders = {
        "cnnkit cold": cnnkit("cold", to_target, cold),
        "cnnkit warm": cnnkit("warm", to_target, warm),
        "peer": Contender(peer_cmd, runs_dir / f"{name}-peer.json", read_peer_run, warm_up=False),
        "cnnkit no flags": cnnkit("no-flags", [], warm),
        "peer 1 thread": Contender(
            peer_cmd, runs_dir / f"{name}-peer1.json", read_peer_run, one_thread, warm_up=False
        ),
    }
    runs = alternate(contenders, repeats)
    figures = {label: medians(rows) for label, rows in runs.items()}
    ratios = {
        f"{peer} / {ours}": {
            unit: round(figures[peer][unit] / figures[ours][unit], 2)
            for unit in ("wall_seconds", "cpu_seconds")
        }
        for peer in ("peer", "peer 1 thread")
        for ours in ("cnnkit cold", "cnnkit warm")
    }
    reached = all(figures[k]["reached_target"] for k in ("peer", "cnnkit cold", "cnnkit warm"))
    goal_ratios = [ratios[f"peer / {k}"]["wall_seconds"] for k in ("cnnkit cold", "cnnkit warm")]
    return {
        "data": str(data),
        "data_drawn_by": f"cnnkit data shapes DIR --count {SHAPES_PER_CLASS} --style "
        f"{SHAPES_STYLE} (1,200 images, 128x128)"
        if not quick
        else "quick subset",
        "same_validation_images": same_validation_images(data, contenders["cnnkit warm"].out),
        "target": target,
        "commands": {
            label: ("OMP_NUM_THREADS=1 " if c.env is one_thread else "")
            + " ".join(c.command).replace(str(c.out), "RUN")
            for label, c in contenders.items()
        },
        "runs": runs,
        "medians": figures,
        "ratios_of_medians": ratios,
        "issue_target": None
        if quick
        else {
            "goal": f"cnnkit's whole-process time to {target:.0%} at least {goal:g}x less than "
            "the exercise recipe's (medians, both reaching the target)",
            "met": reached and min(goal_ratios) >= goal,
        },
    }


def run_default_vs_preset(name: str, data: Path, repeats: int, quick: bool) -> dict[str, object]:
    """``cnnkit train DATA`` with no flags against ``--model PRESET``, as a user types them
    (no target: both run their full recipe), warm cache, alternating, ``repeats`` each."""
    _, preset, target, ratio = DEFAULT_VS_PRESET[name]
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(fresh_dir(BENCH_DIR / f"cache-tta-{name}"))}
    extra = ["--epochs", str(QUICK["epochs"])] if quick else []
    labels = {"no flags": [*extra], f"--model {preset}": ["--model", preset, *extra]}
    contenders = {}
    for i, (label, flags) in enumerate(labels.items()):
        out = BENCH_DIR / "runs-tta" / f"{name}-{i}"
        cmd = [*cnnkit_command(), "train", str(data), "--out", str(out), "--quiet", *flags]
        contenders[label] = Contender(cmd, out, read_cnnkit_run, env)
    runs = alternate(contenders, repeats)
    medians = {
        label: {
            "wall_seconds": median([r["wall_seconds"] for r in rows]),
            "test_acc": median([r["best_val_acc"] for r in rows]),
            "model": rows[0]["model"],
        }
        for label, rows in runs.items()
    }
    default, named = medians["no flags"], medians[f"--model {preset}"]
    wall_ratio = default["wall_seconds"] / named["wall_seconds"]
    return {
        "commands": {
            label: " ".join(c.command).replace(str(c.out), "RUN") for label, c in contenders.items()
        },
        "runs": runs,
        "medians": medians,
        "default_wall_over_preset_wall": round(wall_ratio, 3),
        "issue_target": None
        if quick
        else {
            "goal": f"no flags: {target:.0%} test accuracy in at most {ratio}x the wall time "
            f"of --model {preset} (medians)",
            "met": default["test_acc"] >= target and wall_ratio <= ratio,
        },
    }


# -------------------------------------------------------------------------- Evaluation


def verdict(name: str, result: dict) -> dict[str, object]:
    """The issue's target for the 2-core machine, checked against this run's figures."""
    cold, warm = result["cold"], result["warm"]
    if name == "mnist":
        met = warm["reached_target"] and warm["wall_seconds"] <= 10
        return {"goal": "99.0% test accuracy in at most 10 s (warm)", "met": met}
    met = all(
        r["reached_target"] and r["wall_seconds"] <= 600 and r["peak_rss_mb"] < 2500
        for r in (cold, warm)
    )
    return {"goal": "94% test accuracy in at most 600 s, peak RSS under 2.5 GB", "met": met}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = [*VS_PEER, *RECIPES, *DEFAULT_VS_PRESET]
    parser.add_argument("--dataset", choices=[*choices, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="shapes, mnist-default: rounds")
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 1 epoch each")
    args = parser.parse_args()
    names = choices if args.dataset == "all" else [args.dataset]
    info = machine()
    info["load_average_1_5_15_at_start"] = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, dict] = {}
    repeats = 1 if args.quick else args.repeats
    for name in names:
        data = data_folder(name, args.quick)
        if name in VS_PEER:
            results[name] = run_vs_peer(name, data, repeats, args.quick)
            continue
        if name in DEFAULT_VS_PRESET:
            results[name] = {"data": str(data)}
            results[name].update(run_default_vs_preset(name, data, repeats, args.quick))
            continue
        recipe = RECIPES[name]
        results[name] = {"data": str(data), "target": recipe.target}
        results[name].update(run_cnnkit(name, recipe, data, args.quick))
        # quick runs are smoke tests on tiny subsets: no verdict
        results[name]["issue_target"] = None if args.quick else verdict(name, results[name])
    info["load_average_1_5_15_at_end"] = [round(v, 2) for v in os.getloadavg()]
    emit(
        {
            "benchmark": "time_to_accuracy",
            "quick": args.quick,
            "machine": info,
            "timed": "wall_seconds: fork to exit of the child process; peak_rss_mb: its "
            "ru_maxrss (os.wait4); load: the 1-minute load average as the run started; "
            "seconds_to_target: from summary.json (training start) or peer.py's main(); "
            "train_seconds: cnnkit's train() (summary.json wall_seconds); epochs_seconds: "
            "its epochs (metrics.csv); report_seconds: report.html's mtime after "
            "summary.json's",
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
