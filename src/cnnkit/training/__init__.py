"""Training: the loop, augmentation and what a run writes."""

from cnnkit.training.augment import build_augmentation
from cnnkit.training.loop import TrainResult, train

__all__ = ["TrainResult", "build_augmentation", "train"]
