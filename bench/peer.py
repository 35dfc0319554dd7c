"""The baseline: the learning material's exercise as a learner writes it in plain PyTorch.

A ``Dataset`` that opens every file with PIL on every access, resizes it to 128x128 and turns
it into a tensor through numpy (``ToTensor`` + ``Normalize(0.5, 0.5)``: pixels in [-1, 1]),
with the exercise's random flips (horizontal 0.5, vertical 0.3) on training images; a
``DataLoader`` of batches of 50, ``shuffle=False``, ``num_workers=0``, over the training part
in the one random order ``random_split`` gives it; the exercise's network as a plain
``nn.Module`` (conv 3->12, pool, relu, conv 12->12, pool, relu, conv 12->24, dropout2d 0.2,
relu, dropout 0.5 while training, flatten, dense, log-softmax), ``CrossEntropyLoss``, Adam at
1e-3, fp32, NCHW. No cnnkit import: this is what cnnkit is measured against.

Where it departs from the exercise, it does so to compare like with like: it validates on the
same 20% of every class that cnnkit draws with the same seed (the exercise: a random 30%), so
both are scored on the same images, and validation images are not flipped (the exercise's
transform flips its test images too). Usage::

    .venv/bin/python bench/peer.py --data /tmp/cnnkit-bench/shapes --target-accuracy 0.99
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux: from when this module ran
        return time.time() - _MODULE_LOADED


_MODULE_LOADED = time.time()

# ---------------------------------------------------------------------------------- Data


def list_images(root: Path, classes: list[str] | None = None) -> tuple[list[str], list, list]:
    """(classes, paths, labels) of ``root/<class>/*``, sorted like cnnkit's folder scan."""
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[0] != ".")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                paths.append(path)
                labels.append(label)
    return classes, paths, labels


def split_80_20(labels: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): 20% of every class, the same draw as cnnkit's stratified split."""
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(max(round(len(idx) * 0.2), 1), len(idx) - 1) if len(idx) >= 2 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class ImageFiles(Dataset):
    """Decodes one file per item, every epoch, as ``ImageFolder`` + transforms do."""

    def __init__(self, paths: list, labels: list[int], size: int = 128, flip: bool = False):
        self.paths, self.labels, self.size, self.flip = paths, labels, size, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size))
        if self.flip and torch.rand(()) < 0.5:  # RandomHorizontalFlip(0.5)
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.flip and torch.rand(()) < 0.3:  # RandomVerticalFlip(0.3)
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]: ToTensor
        x = torch.from_numpy(x).permute(2, 0, 1)  # (3, H, W)
        return (x - 0.5) / 0.5, self.labels[i]  # Normalize(0.5, 0.5): [-1, 1]


def build_datasets(
    data: Path, size: int = 128, seed: int = 0, flip: bool = True
) -> tuple[list[str], ImageFiles, ImageFiles]:
    """(classes, train, val): ``DIR/train`` + ``DIR/test`` (or ``val``) when given, else 80/20."""
    held = next((data / s for s in ("val", "test") if (data / s).is_dir()), None)
    if (data / "train").is_dir() and held is not None:
        classes, train_paths, train_labels = list_images(data / "train")
        _, val_paths, val_labels = list_images(held, classes)
    else:
        classes, paths, labels = list_images(data)
        tr, va = split_80_20(labels, seed)
        train_paths, train_labels = [paths[i] for i in tr], [labels[i] for i in tr]
        val_paths, val_labels = [paths[i] for i in va], [labels[i] for i in va]
    order = np.random.default_rng(seed).permutation(len(train_paths))  # random_split's order
    train_paths, train_labels = [train_paths[i] for i in order], [train_labels[i] for i in order]
    train = ImageFiles(train_paths, train_labels, size, flip=flip)
    return classes, train, ImageFiles(val_paths, val_labels, size)


# ------------------------------------------------------------------------------- Network


class Net(nn.Module):
    """The exercise's network, as the exercise writes it."""

    def __init__(self, num_classes: int = 3, size: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=12, kernel_size=3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.conv2 = nn.Conv2d(in_channels=12, out_channels=12, kernel_size=3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(in_channels=12, out_channels=24, kernel_size=3, stride=1, padding=1)
        self.drop = nn.Dropout2d(p=0.2)
        self.features = (size // 4) * (size // 4) * 24  # two 2x2 poolings: 32 * 32 * 24
        self.fc = nn.Linear(in_features=self.features, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pool(self.conv1(x)))  # (B, 12, 64, 64)
        x = F.relu(self.pool(self.conv2(x)))  # (B, 12, 32, 32)
        x = F.relu(self.drop(self.conv3(x)))  # (B, 24, 32, 32)
        x = F.dropout(x, training=self.training)  # the exercise's: "only drop while training"
        x = x.view(-1, self.features)
        x = self.fc(x)
        return torch.log_softmax(x, dim=1)  # as the exercise; CrossEntropyLoss is unchanged by it


# ------------------------------------------------------------------------------ Training


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_criteria: nn.Module,
    max_batches: int | None = None,
) -> tuple[float, int, float]:
    """One pass over ``loader``: (mean loss, images seen, seconds)."""
    start = time.perf_counter()
    model.train()
    train_loss, seen, batches = 0.0, 0, 0
    for data, target in loader:
        optimizer.zero_grad()
        output = model(data)
        loss = loss_criteria(output, target)
        train_loss += loss.item()
        loss.backward()
        optimizer.step()
        seen += len(target)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    return train_loss / max(batches, 1), seen, time.perf_counter() - start


# ---------------------------------------------------------------------------- Evaluation


def evaluate(model: nn.Module, loader: DataLoader, loss_criteria: nn.Module) -> tuple[float, float]:
    """(mean loss, accuracy) over ``loader``."""
    model.eval()
    test_loss, correct, batches = 0.0, 0, 0
    with torch.no_grad():
        for data, target in loader:
            output = model(data)
            test_loss += loss_criteria(output, target).item()
            correct += torch.sum(target == output.argmax(1)).item()
            batches += 1
    return test_loss / max(batches, 1), correct / len(loader.dataset)


# -------------------------------------------------------------------------------- Main


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="DIR/<class>/* or DIR/train|test")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--target-accuracy", type=float, default=None)
    parser.add_argument("--max-seconds", type=float, default=None, help="checked after each epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flip", action="store_true", help="leave out the random flips")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 20 shapes per class")
    startup = process_seconds()
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
        if args.data is None:  # harness only: the recipe itself never imports cnnkit
            from benchlib import shapes_folder

            args.data = shapes_folder(20)
    if args.data is None:
        parser.error("--data is required (or --quick)")
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    classes, train_set, val_set = build_datasets(args.data, seed=args.seed, flip=not args.no_flip)
    train_loader = DataLoader(train_set, batch_size=50, shuffle=False, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=50, shuffle=False, num_workers=args.workers)
    model = Net(num_classes=len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    loss_criteria = nn.CrossEntropyLoss()

    val_acc, train_loss = [], []
    images, train_seconds = 0, 0.0
    to_target = process_to_target = None
    for epoch in range(1, args.epochs + 1):
        loss, seen, seconds = train_epoch(model, train_loader, optimizer, loss_criteria)
        images, train_seconds = images + seen, train_seconds + seconds
        _, acc = evaluate(model, val_loader, loss_criteria)
        train_loss.append(round(loss, 5))
        val_acc.append(round(acc, 5))
        print(f"epoch {epoch}: loss {loss:.4f}, val acc {acc:.2%}, {seconds:.1f}s", file=sys.stderr)
        if args.target_accuracy is not None and acc >= args.target_accuracy:
            to_target = time.perf_counter() - started
            process_to_target = process_seconds()
            break
        if args.max_seconds is not None and process_seconds() > args.max_seconds:
            break
    return {
        "recipe": "peer: the exercise in plain PyTorch: PIL per sample, DataLoader batch 50 "
        "(shuffle=False, random_split order), fp32 NCHW, Adam 1e-3",
        "data": str(args.data),
        "classes": classes,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "epochs": len(val_acc),
        "val_acc": val_acc,
        "train_loss": train_loss,
        "target_accuracy": args.target_accuracy,
        "reached_target": to_target is not None,
        "seconds_to_target": None if to_target is None else round(to_target, 3),
        "process_seconds_to_target": None
        if process_to_target is None
        else round(process_to_target, 3),
        "startup_seconds": round(startup, 3),
        "wall_seconds": round(process_seconds(), 3),
        "images_per_second": round(images / train_seconds, 1) if train_seconds else 0.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "timing": "startup_seconds: process start to main() (interpreter and imports); "
        "wall_seconds: whole process to the end of training; images_per_second: training "
        "batches only (decode included, validation excluded)",
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
