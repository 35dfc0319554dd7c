"""``cnnkit train --live``: the page's event stream gets one update per epoch while training
runs, with the fixed validation image's feature maps of that epoch's weights, then says that
training finished (or why it stopped) and the server goes away."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.inspection.maps import layer_outputs, normalize_maps
from cnnkit.serve.live import LiveBoard, watch_training
from cnnkit.training.loop import train
from conftest import tiny_config
from serving import wait_until

pytestmark = pytest.mark.usefixtures("single_thread")


def read_events(url: str, events: list[dict], arrived: dict[int, threading.Event]) -> None:
    """Follow ``url``'s event stream to its end; set ``arrived[epoch]`` as each epoch comes."""
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        for line in response.iter_lines():
            if line:
                key, _, value = line.partition(":")
                event[key] = value.strip()
                continue
            if "event" in event:
                event["data"] = json.loads(event["data"])
                events.append(event)
                if event["event"] == "epoch":
                    arrived.setdefault(event["data"]["row"]["epoch"], threading.Event()).set()
            event = {}


def is_closed(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_the_page_gets_each_epoch_while_training_runs(tiny_shapes: Path, tmp_path: Path) -> None:
    epochs = 3
    events: list[dict] = []
    arrived: dict[int, threading.Event] = {e: threading.Event() for e in range(1, epochs + 1)}
    own_maps: dict[int, dict[str, tuple[float, float]]] = {}
    with watch_training(epochs, title="tiny") as board:
        assert board.url.startswith("http://127.0.0.1:") and board.url.endswith("/live")
        page = httpx.get(board.url)
        assert page.status_code == 200 and "training live" in page.text
        reader = threading.Thread(
            target=read_events, args=(board.url + "/events", events, arrived), daemon=True
        )
        reader.start()

        def hook(row, model, data):
            board.epoch_end(row, model, data)
            pixels = torch.from_numpy(np.asarray(data.val.images[0])[None].copy())
            outputs = layer_outputs(model, data.preprocessing.to_model_input(pixels))
            own_maps[row["epoch"]] = (
                {o.name: (o.min, o.max) for o in outputs},
                {o.name: o.values for o in outputs},
            )
            # The page has this epoch before the next one starts: an update per epoch.
            assert arrived[row["epoch"]].wait(60), f"epoch {row['epoch']} never reached the page"

        result = train(tiny_config(tiny_shapes, epochs=epochs), tmp_path / "run",
                       progress=False, on_epoch=hook)  # fmt: skip
    reader.join(30)
    assert is_closed(board.url)  # the server stopped with training

    kinds = [e["event"] for e in events]
    assert kinds == ["epoch"] * epochs + ["finished"]
    assert [e["id"] for e in events[:epochs]] == ["1", "2", "3"]
    for epoch, event in enumerate(events[:epochs], start=1):
        body = event["data"]
        assert body["epochs"] == epochs
        assert body["row"] == pytest.approx(result.history[epoch - 1])
        maps = body["maps"]  # the explorer's overview JSON, of this epoch's weights
        assert maps["epoch"] == epoch
        ranges = own_maps[epoch][0]
        assert [layer["name"] for layer in maps["layers"]] == list(ranges)
        for layer in maps["layers"]:
            assert (layer["min"], layer["max"]) == pytest.approx(ranges[layer["name"]])
            if len(layer["out_shape"]) == 3:  # each map normalised to 0-255 on its own
                shape = layer["out_shape"]
                grey = np.frombuffer(base64.b64decode(layer["grey"]), np.uint8).reshape(shape)
                np.testing.assert_array_equal(
                    grey, normalize_maps(own_maps[epoch][1][layer["name"]])
                )
                assert len(layer["ranges"]) == shape[0]
        assert sum(maps["probabilities"]) == pytest.approx(1.0)
    first, last = events[0]["data"]["maps"], events[epochs - 1]["data"]["maps"]
    assert first["input"] == last["input"]  # one fixed validation image
    assert first["layers"][0]["min"] != last["layers"][0]["min"]  # its maps change
    finished = events[-1]["data"]
    assert finished["epochs_run"] == epochs
    assert finished["message"].startswith(f"Training finished after {epochs} epochs")


def test_a_late_page_gets_every_epoch_and_a_reconnect_resumes(tiny_shapes, tmp_path) -> None:
    with watch_training(2) as board:
        train(tiny_config(tiny_shapes), tmp_path / "run", progress=False,
              on_epoch=board.epoch_end)  # fmt: skip
        state = httpx.get(board.url + "/state").json()
        assert [r["epoch"] for r in state["rows"]] == [1, 2]
        assert state["maps"]["epoch"] == 2 and state["finished"] is None
        board.finish("done")
        events: list[dict] = []
        read_events(board.url + "/events", events, {})  # opened after training
        again: list[dict] = []
        with httpx.Client(timeout=30) as client:  # as EventSource reconnects: Last-Event-ID
            response = client.get(board.url + "/events", headers={"last-event-id": "1"})
        again = [line for line in response.text.splitlines() if line.startswith("event:")]
    assert [e["event"] for e in events] == ["epoch", "epoch", "finished"]
    assert "maps" not in events[0]["data"] and events[1]["data"]["maps"]["epoch"] == 2
    assert events[2]["data"]["message"] == "done"  # the first word on how it ended stays
    assert again == ["event: epoch", "event: finished"]


def test_an_error_is_what_the_page_says_and_the_server_stops(tiny_shapes, tmp_path) -> None:
    events: list[dict] = []

    def broken_hook(row, model, data):
        board.epoch_end(row, model, data)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"), watch_training(5) as board:
        reader = threading.Thread(target=read_events, args=(board.url + "/events", events, {}))
        reader.start()
        # The page is connected before training starts: an error at the first epoch would
        # otherwise stop the server before a slow reader thread got there (a flaky test).
        wait_until(lambda: board.streams, what="the page never connected")
        train(tiny_config(tiny_shapes, epochs=5), tmp_path / "run", progress=False,
              on_epoch=broken_hook)  # fmt: skip
    reader.join(30)
    assert [e["event"] for e in events][-1] == "finished"
    assert events[-1]["data"]["message"] == "Training stopped: disk full"
    assert is_closed(board.url)


def test_metrics_that_are_not_numbers_are_null_and_failed_maps_keep_the_figures(
    tiny_shapes, caplog
) -> None:
    board = LiveBoard(epochs=1)

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no forward")

    row = {"epoch": 1, "train_loss": 0.5, "val_loss": math.nan, "val_acc": math.nan}
    with caplog.at_level("WARNING", logger="cnnkit"):
        board.epoch_end(row, Broken(), object())  # type: ignore[arg-type]
    assert "no feature maps for epoch 1" in caplog.text
    assert board.rows() == [{"epoch": 1, "train_loss": 0.5, "val_loss": None, "val_acc": None}]
    assert board.maps() is None
    json.dumps(board.state(), allow_nan=False)  # valid JSON for the page


def test_cli_live_prints_the_address_and_stops_the_server(tiny_shapes, tmp_path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(tiny_shapes), "--out", str(run), "--live",
        "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("live: ")]
    url = line.removeprefix("live: watch training at ")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/live")
    assert is_closed(url)
    assert (run / "model.safetensors").is_file()


def test_ctrl_c_still_stops_a_live_run_with_a_checkpoint(tiny_shapes, tmp_path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(tmp_path / "cache"), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "train", str(tiny_shapes), "--out", str(run), "--live",
         "--image-size", "16", "--epochs", "500", "--batch-size", "4", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("live: watch training at "), line
        url = line.split(" at ")[1].strip()
        events: list[dict] = []
        arrived = {1: threading.Event()}
        reader = threading.Thread(target=read_events, args=(url + "/events", events, arrived))
        reader.start()
        assert arrived[1].wait(120), "no epoch reached the page"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGINT; checkpoint saved")
    assert events[-1]["event"] == "finished"
    assert events[-1]["data"]["message"].startswith("Training stopped: interrupted by SIGINT")
    assert is_closed(url)
    assert (run / "checkpoints").is_dir()


def wakeups(name: str) -> int:
    """Voluntary context switches so far of this process's thread called ``name``."""
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_the_server_sleeps_while_a_page_waits_for_the_next_epoch() -> None:
    # Training shares the GIL with the server's thread: between epochs that thread must not
    # wake up (uvicorn's own loop looks for a stop ten times a second; a polling stream too).
    events: list[dict] = []
    with watch_training(1) as board:
        reader = threading.Thread(target=read_events, args=(board.url + "/events", events, {}))
        reader.start()
        while not board.streams:
            time.sleep(0.01)
        time.sleep(0.2)
        before = wakeups("cnnkit-server")
        time.sleep(1.0)
        woke = wakeups("cnnkit-server") - before
    reader.join(30)
    assert woke <= 2, f"the server's thread woke {woke} times in a second"
    assert [e["event"] for e in events] == ["finished"]  # and still answered at the end
