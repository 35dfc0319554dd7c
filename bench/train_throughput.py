"""Training throughput (images/s) of every preset, and cnnkit against the peer loop.

cnnkit: ``cnnkit.training.loop.train`` on a generated shapes folder for ``--epochs`` epochs
per timed window, its own ``images_per_second`` (training steps only: batch gather, normalise,
augment, forward, backward, optimiser step; data preparation, validation and saving are not
counted), default settings (precision auto, batch 64, augmentation on with vertical flips).
Peer: one epoch of ``bench/peer.py``'s loop (per-sample PIL decode in the DataLoader, batch
50, fp32 NCHW, Adam) on the same training images with the same network (the ``seed`` preset,
128x128). The two alternate in one process; each figure is the median of ``--repeats``
windows after one untimed warm-up window each. Usage::

    .venv/bin/python bench/train_throughput.py [--quick] [--repeats 5] [--epochs 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import peer
from benchlib import BENCH_DIR, cnnkit_train, emit, fresh_dir, log, machine, median, shapes_folder

PEER_PRESET = "seed"  # the preset that is the peer's network, layer for layer


def main() -> None:
    # ------------------------------------------------------------------------------- Setup
    from cnnkit.models import list_presets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per figure")
    parser.add_argument("--epochs", type=int, default=2, help="cnnkit epochs per window")
    parser.add_argument("--count", type=int, default=400, help="shapes per class")
    parser.add_argument("--presets", default=",".join(list_presets()), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 window of 1 epoch, 20 per class")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs, args.count = 1, 1, 20
    presets = [p for p in args.presets.split(",") if p]
    info = machine()

    # -------------------------------------------------------------------------------- Data
    folder = shapes_folder(args.count)
    cache = fresh_dir(BENCH_DIR / "cache-throughput")
    runs = BENCH_DIR / "runs-throughput"
    classes, train_set, _ = peer.build_datasets(folder)
    peer_loader = DataLoader(train_set, batch_size=50, shuffle=True, num_workers=0)

    # ----------------------------------------------------------------------------- Network
    torch.manual_seed(0)
    peer_net = peer.Net(num_classes=len(classes))
    peer_opt = torch.optim.Adam(peer_net.parameters(), lr=0.001)
    peer_loss = nn.CrossEntropyLoss()

    # ---------------------------------------------------------------------------- Training
    log("warm-up: one untimed window each (decode cache, kernels, allocator)")
    for preset in presets:
        cnnkit_train(preset, folder, runs / preset, epochs=1, cache_dir=cache)
    if PEER_PRESET in presets:
        peer.train_epoch(peer_net, peer_loader, peer_opt, peer_loss, max_batches=3)
    cnnkit_ips: dict[str, list[float]] = {p: [] for p in presets}
    precision: dict[str, str] = {}
    peer_ips: list[float] = []
    for repeat in range(1, args.repeats + 1):
        for preset in presets:
            result = cnnkit_train(
                preset, folder, runs / preset, epochs=args.epochs, cache_dir=cache
            )
            cnnkit_ips[preset].append(result.images_per_second)
            precision[preset] = result.precision
            line = f"window {repeat}/{args.repeats}: cnnkit {preset} {result.images_per_second:.0f}"
            if preset == PEER_PRESET:
                _, seen, seconds = peer.train_epoch(peer_net, peer_loader, peer_opt, peer_loss)
                peer_ips.append(seen / seconds)
                line += f", peer {peer_ips[-1]:.0f}"
            log(line + " img/s")

    # -------------------------------------------------------------------------- Evaluation
    from cnnkit.models import load_model_spec

    rows = {}
    for preset in presets:
        rows[preset] = {
            "image_size": load_model_spec(preset).input_size,
            "precision": precision[preset],
            "images_per_second": round(median(cnnkit_ips[preset]), 1),
            "windows": [round(v, 1) for v in cnnkit_ips[preset]],
        }
    comparison = None
    if peer_ips:
        cnnkit_seed = median(cnnkit_ips[PEER_PRESET])
        comparison = {
            "model": f"{PEER_PRESET} preset = peer.Net, 128x128",
            "cnnkit_images_per_second": round(cnnkit_seed, 1),
            "peer_images_per_second": round(median(peer_ips), 1),
            "peer_windows": [round(v, 1) for v in peer_ips],
            "ratio_cnnkit_over_peer": round(cnnkit_seed / median(peer_ips), 2),
        }
    emit(
        {
            "benchmark": "train_throughput",
            "quick": args.quick,
            "machine": info,
            "data": {"folder": str(folder), "train_images": len(train_set)},
            "repeats": args.repeats,
            "timed": f"cnnkit: images_per_second of cnnkit.training.loop.train over "
            f"{args.epochs} epoch(s) per window (training steps only); peer: one epoch of "
            "peer.train_epoch (PIL decode in the DataLoader included); median of the windows",
            "presets": rows,
            "cnnkit_vs_peer": comparison,
        }
    )


if __name__ == "__main__":
    main()
