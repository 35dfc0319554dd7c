"""Forward cost of the pretrained-network presets: images/s of a batch at 224 px, fp32 and bf16.

Each backbone is built at its input size with a 10-class head, in eval mode, channels_last,
under ``torch.inference_mode`` (bf16: cnnkit's autocast, as ``Classifier.logits`` runs it).
After one untimed batch, ``--repeats`` batches are timed; the figure is the batch size over
the median seconds. Random weights: the arithmetic is the same as with pretrained ones.

    .venv/bin/python bench/backbones.py [--quick] [--batch 32] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import emit, log, machine, median
from cnnkit.models import build_network, load_model_spec
from cnnkit.models.summary import summarize
from cnnkit.runtime import autocast

BACKBONES = ["efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet34", "resnet50"]


def images_per_second(net: torch.nn.Module, x: torch.Tensor, precision: str, repeats: int):
    device = torch.device("cpu")
    seconds = []
    with torch.inference_mode(), autocast(device, precision):
        for i in range(repeats + 1):
            start = time.perf_counter()
            net(x)
            if i:  # the first batch sets up the kernels
                seconds.append(time.perf_counter() - start)
    return round(len(x) / median(seconds), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 at 64 px, one repeat")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.repeats = 4, 64, 1
    result = {"machine": machine(), "batch": args.batch, "size": args.size, "backbones": {}}
    for name in BACKBONES:
        net = build_network(load_model_spec(name).layers, 10, 3, args.size).eval()
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
            memory_format=torch.channels_last
        )
        size = summarize(name, image_size=args.size, classes=10)
        row = {"params": size["total_params"], "gflops_per_image": size["total_flops"] / 1e9}
        for precision in ("fp32", "bf16"):
            row[f"{precision}_img_per_s"] = images_per_second(net, x, precision, args.repeats)
        log(f"{name}: {row}")
        result["backbones"][name] = row
    emit(result)


if __name__ == "__main__":
    main()
