"""Where a run stands: the best-keeper, the stopping rule and the checkpoint form of
``Progress`` (grouped now, flat in older checkpoints)."""

from __future__ import annotations

import math

import pytest

from cnnkit.config import TrainConfig
from cnnkit.training.checkpoint_checks import state_problem
from cnnkit.training.progress import (
    Best,
    Position,
    Progress,
    Timing,
    progress_from_state,
    progress_to_state,
    stop_reason,
)
from conftest import training_state


def judged(scores: list[tuple[float, float]], head_epochs: int = 0) -> list[Best]:
    """The record after each epoch of (validation accuracy, loss)."""
    best, after = Best(), []
    for epoch, (acc, loss) in enumerate(scores, start=1):
        best = best.judge(epoch, acc, loss, head_only=epoch <= head_epochs)
        after.append(best)
    return after


def test_a_higher_accuracy_or_a_lower_loss_at_the_same_accuracy_is_the_best() -> None:
    after = judged([(0.5, 1.0), (0.6, 0.8), (0.6, 0.9), (0.6, 0.7), (0.55, 0.1)])
    assert [b.epoch for b in after] == [1, 2, 2, 4, 4]
    assert [b.stale for b in after] == [0, 0, 1, 0, 1]
    assert (after[-1].acc, after[-1].loss) == (0.6, 0.7)


def test_at_100_percent_a_lower_loss_keeps_the_weights_but_spends_patience() -> None:
    after = judged([(0.9, 0.5), (1.0, 0.3), (1.0, 0.2), (1.0, 0.25)])
    assert [b.epoch for b in after] == [1, 2, 3, 3]
    assert [b.stale for b in after] == [0, 0, 1, 2]


def test_head_epochs_spend_no_patience() -> None:
    after = judged([(0.6, 0.5), (0.5, 0.6), (0.5, 0.6), (0.5, 0.6)], head_epochs=2)
    assert [b.epoch for b in after] == [1, 1, 1, 1]
    assert [b.stale for b in after] == [0, 0, 1, 2]


def test_without_validation_images_the_latest_epoch_is_kept() -> None:
    after = judged([(math.nan, math.nan), (math.nan, math.nan)])
    assert [(b.epoch, b.stale) for b in after] == [(1, 0), (2, 0)]


def test_the_stopping_rule() -> None:
    cfg = TrainConfig(patience=2, target_accuracy=0.9)
    assert stop_reason(cfg, 0.95, Best(stale=5)) == "target_accuracy"
    assert stop_reason(cfg, 0.5, Best(stale=2)) == "patience"
    assert stop_reason(cfg, 0.5, Best(stale=1)) == "epochs"
    assert stop_reason(TrainConfig(patience=0), 0.5, Best(stale=99)) == "epochs"
    assert stop_reason(TrainConfig(patience=0), math.nan, Best()) == "epochs"


def test_finished_is_whether_a_rule_stopped_the_run() -> None:
    assert not Progress().finished
    assert Progress(stopped="patience").finished


def test_progress_round_trips_through_its_checkpoint_form() -> None:
    p = Progress(
        Position(2, 5, 1.5, 7),
        Best(2, 0.75, 0.4, 1),
        Timing(12.5, 9.0, 640),
        [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}],
        "target_accuracy",
        11.0,
    )
    state = progress_to_state(p)
    assert set(state) == {"position", "best", "timing", "history", "stopped", "seconds_to_target"}
    assert progress_from_state(state) == p
    state["history"][0]["val_acc"] = 0.0  # a copy, not the run's own rows
    assert p.history[0]["val_acc"] == 0.5


FLAT = {  # as checkpoints held progress before it had groups: fifteen fields
    "epoch": 2,
    "step": 3,
    "loss_sum": 4.5,
    "correct": 6,
    "history": [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}],
    "best_acc": 0.75,
    "best_loss": 0.4,
    "best_epoch": 2,
    "stale": 0,
    "images_seen": 320,
    "train_seconds": 4.0,
    "elapsed": 6.0,
    "seconds_to_target": None,
    "finished": False,
    "stopped": "epochs",
}


def test_the_flat_progress_of_older_checkpoints_is_read_and_checked() -> None:
    assert progress_from_state(FLAT) == Progress(
        Position(2, 3, 4.5, 6), Best(2, 0.75, 0.4, 0), Timing(6.0, 4.0, 320), FLAT["history"]
    )
    finished = progress_from_state({**FLAT, "finished": True, "stopped": "patience"})
    assert finished.finished and finished.stopped == "patience"
    state = training_state()
    assert state_problem({**state, "progress": FLAT}, ("progress",), tuple(state)) is None
    bad = {**state, "progress": {**FLAT, "stale": -1}}
    assert state_problem(bad, ("progress",), tuple(state)) == "progress.stale is int -1"


@pytest.mark.parametrize(
    ("progress", "why"),
    [
        ({"position": {"step": 1.5}}, "progress.position.step is float 1.5"),
        ({"best": {"acc": "high"}}, "progress.best.acc is str 'high'"),
        ({"timing": {"elapsed": 1.0, "laps": 2}}, "unknown progress.timing field 'laps'"),
        ({"position": {}, "epoch": 2}, "unknown progress field 'epoch'"),  # flat in grouped
        ({"position": [1, 2]}, "progress.position is not a mapping"),
    ],
)
def test_a_grouped_progress_is_checked_field_by_field(progress: dict, why: str) -> None:
    state = {**training_state(), "progress": progress}
    assert state_problem(state, ("progress",), tuple(state)) == why
