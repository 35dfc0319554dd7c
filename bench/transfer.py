"""Transfer learning: CIFAR-10 with 100 training images per class, and feature-extraction speed.

1. **Feature extraction** at 224 px, on the same decoded CIFAR-10 test images: the reference
   EfficientNet-Lite0 in plain PyTorch (``efficientnet_lite_pytorch``, fp32, eval,
   ``no_grad``, ``extract_features`` and average pooling, as its README runs it) against
   cnnkit's frozen-backbone path (``training.features.FeatureExtractor``: batchnorm folded,
   ReLU6 fused, channels_last, bf16 where the CPU runs it natively). Both start from the
   same uint8 images and normalise them. One untimed batch, then ``--repeats`` timed passes
   over all images, alternating the two; img/s from the median. Also how far apart their
   features are (max difference over the largest value).
2. **The CLI as a user types it**, each in its own process with a cold cache (decode and
   features computed afresh), its whole wall time measured from the fork to the exit
   (imports, decoding, training, the report): from scratch (``cnnkit train DATA``, model
   auto), the head alone on the frozen EfficientNet-Lite0, and its recommended fine-tune
   (``--model efficientnet_lite0 --weights imagenet``, no other flag). Each run is then
   scored by ``cnnkit evaluate RUN TEST`` on test images it never saw.

The data: ``--per-class`` training images of each class drawn by ``--seed`` from CIFAR-10's
50,000 (the run splits off its own 20% for validation) and ``--test-per-class`` test images
of each class from its 10,000, copied under ``CNNKIT_BENCH_DIR`` (never the repository).

    flock /work/wt/bench.lock .venv/bin/python bench/transfer.py [--quick] [--runs a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import BENCH_DIR, cnnkit_command, emit, fresh_dir, log, machine, median, run_child
from benchlib import unpacked as unpack_dataset

RUNS = {
    "scratch": [],  # model auto: what cnnkit picks for 32 px photos
    "head": ["--model", "efficientnet_lite0", "--weights", "imagenet", "--epochs", "8",
             "--freeze-epochs", "8"],
    "finetune": ["--model", "efficientnet_lite0", "--weights", "imagenet"],
}  # fmt: skip


def subset(source: Path, split: str, per_class: int, seed: int, folder: Path) -> Path:
    """``per_class`` files of each class of ``source/split`` drawn by ``seed``, copied."""
    if folder.is_dir():
        return folder
    rng = random.Random(seed)
    tmp = fresh_dir(folder.with_name(f"{folder.name}.tmp{os.getpid()}"))
    for cls in sorted(p.name for p in (source / split).iterdir()):
        files = sorted(p.name for p in (source / split / cls).iterdir())
        (tmp / cls).mkdir()
        for name in rng.sample(files, per_class):
            shutil.copy2(source / split / cls / name, tmp / cls / name)
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------- feature extraction


def extraction(images: np.ndarray, repeats: int, batch: int) -> dict:
    """img/s of the reference and of cnnkit's frozen-backbone path on ``images``."""
    from efficientnet_lite_pytorch import EfficientNet

    from cnnkit.data.images import to_model_input
    from cnnkit.models import build_network, load_model_spec
    from cnnkit.models.weights import load_pretrained, plan_weights
    from cnnkit.runtime import resolve_precision
    from cnnkit.training.features import FeatureExtractor

    spec = load_model_spec("efficientnet_lite0")
    plan = plan_weights("imagenet", spec)
    pre = plan.preprocessing
    mean, std = pre.mean, pre.std
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    reference.load_state_dict(torch.load(plan.location, weights_only=True))
    reference.eval()
    net = build_network(spec.layers, 1000, 3, 224)
    load_pretrained(net, plan, progress=False)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    ours = FeatureExtractor.create(
        net.eval(), net.head_start + 1, preprocessing=pre, precision=precision, device=device,
        cache_root=BENCH_DIR / "unused",
    )  # fmt: skip

    @torch.no_grad()
    def run_reference() -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            x = to_model_input(torch.from_numpy(images[start : start + batch]), mean, std)
            out.append(reference.extract_features(x.contiguous()).mean((2, 3)))
        return torch.cat(out)

    def run_ours() -> torch.Tensor:
        return ours.compute(images, "plain")

    timings: dict[str, list[float]] = {"reference": [], "cnnkit": []}
    features = {"reference": run_reference()[:batch], "cnnkit": run_ours()[:batch]}  # warm-up
    for _ in range(repeats):
        for name, fn in (("reference", run_reference), ("cnnkit", run_ours)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
            log(f"{name}: {len(images) / timings[name][-1]:.1f} img/s")
    ref, got = features["reference"], features["cnnkit"]
    rate = {name: round(len(images) / median(t), 1) for name, t in timings.items()}
    return {
        "images": len(images),
        "batch": batch,
        "size": 224,
        "precision": precision,
        "reference_img_per_s": rate["reference"],
        "cnnkit_img_per_s": rate["cnnkit"],
        "speedup": round(rate["cnnkit"] / rate["reference"], 2),
        "seconds": {k: [round(v, 2) for v in t] for k, t in timings.items()},
        "max_diff_over_max": round(float((got - ref).abs().max() / ref.abs().max()), 4),
    }


# ------------------------------------------------------------------------------- the CLI


def cli_run(name: str, flags: list[str], data: Path, test: Path, work: Path) -> dict:
    """``cnnkit train DATA --out RUN FLAGS`` then ``cnnkit evaluate RUN TEST``, cold cache."""
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(fresh_dir(work / f"cache-{name}"))}
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    train = [*cnnkit_command(), "train", str(data), "--out", str(out), *flags]
    log(f"{name}: {' '.join(train[1:])}")
    load = os.getloadavg()[0]
    code, wall, rss = run_child(train, env, work / f"{name}-train.log")
    if code:
        raise SystemExit(f"error: {name} failed, see {work / f'{name}-train.log'}")
    score = [*cnnkit_command(), "evaluate", str(out), str(test), "--json", "--quiet"]
    code, eval_wall, _ = run_child(score, env, work / f"{name}-eval.json", work / f"{name}-e.log")
    if code:
        raise SystemExit(f"error: evaluating {name} failed, see {work / f'{name}-e.log'}")
    evaluation = json.loads((work / f"{name}-eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    lines = (work / f"{name}-train.log").read_text().splitlines()
    row = {
        "command": "cnnkit "
        + " ".join(train[1:]).replace(str(out), "RUN").replace(str(data), "DATA"),
        "test_accuracy": round(evaluation["accuracy"], 4),
        "test_images": evaluation["count"],
        "wall_s": round(wall, 1),
        "train_loop_s": summary["wall_seconds"],
        "best_val_acc": round(summary["best_val_acc"], 4),
        "epochs_run": summary["epochs_run"],
        "peak_rss_mb": round(rss),
        "evaluate_wall_s": round(eval_wall, 1),
        "load_1min_before": round(load, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "model_line": next((x for x in lines if x.startswith(("training ", "model auto"))), ""),
    }
    log(f"{name}: {row['test_accuracy']:.2%} test accuracy, {row['wall_s']} s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 a class, 64 images timed")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help="of " + ", ".join(RUNS))
    parser.add_argument("--flags", default="", help="more flags for every pretrained run")
    parser.add_argument("--extract-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.test_per_class, args.extract_images, args.repeats = 10, 10, 32, 1
    result: dict = {"machine": machine(), "uptime_start": os.popen("uptime").read().strip()}
    cifar = unpack_dataset("cifar10")
    tag = f"{args.per_class}pc-s{args.seed}"
    data = subset(cifar, "train", args.per_class, args.seed, BENCH_DIR / f"cifar10-{tag}")
    test = subset(
        cifar, "test", args.test_per_class, args.seed,
        BENCH_DIR / f"cifar10-test{args.test_per_class}pc-s{args.seed}",
    )  # fmt: skip

    from cnnkit.data.folder import scan_folder
    from cnnkit.data.images import decode_image

    if args.extract_images:
        paths = scan_folder(test).splits["all"].paths
        picked = np.linspace(0, len(paths) - 1, args.extract_images).astype(np.int64)
        images = np.stack([decode_image(paths[i], 224, 3, "crop")[0] for i in picked])
        result["extraction"] = extraction(images, args.repeats, batch=32)
    work = fresh_dir(BENCH_DIR / "transfer")
    result["runs"] = {}
    for name in args.runs.split(","):
        flags = list(RUNS[name]) + (args.flags.split() if name != "scratch" else [])
        result["runs"][name] = cli_run(name, flags, data, test, work)
    result["uptime_end"] = os.popen("uptime").read().strip()
    emit(result)


if __name__ == "__main__":
    main()
