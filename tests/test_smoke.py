"""The session fixtures themselves: a trained run directory has every file it promises."""

from pathlib import Path

from cnnkit.training.loop import TrainResult


def test_trained_run_has_its_files(trained_run: tuple[Path, TrainResult]) -> None:
    run, result = trained_run
    for name in (
        "config.yaml",
        "metrics.csv",
        "model.safetensors",
        "model.json",
        "summary.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert result.best_val_acc >= 0.85
