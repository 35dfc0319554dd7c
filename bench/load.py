"""Load: concurrent clients against a real ``cnnkit serve`` on loopback, for a bounded time.

The server is the ``cnnkit serve`` command in its own process, listening on 127.0.0.1 at a
free port, serving the ``fast`` preset at 64x64 with untrained weights (latency does not
depend on accuracy), or its ONNX export with ``--onnx``. Once ``/readyz`` answers, ``--clients``
asyncio clients (httpx, one connection each) each POST one 128x128 PNG of a generated shape
as a raw ``image/png`` body to ``/predict``, one request after another, for ``--duration``
seconds, after a short untimed warm-up. Every answer that is not a 200 with one prediction,
and every connection error, counts as an error.

Prints one JSON object: requests, errors (by status), throughput (requests/s), client-side
latency p50/p90/p99/max in ms, the server's own inference time (p50) and mean batch size (the
server runs waiting requests as one batch), and the server process's peak RSS. The clients
run in this process and share the cores with the server.
Usage::

    .venv/bin/python bench/load.py [--quick] [--clients 16] [--duration 20] [--onnx]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchlib import BENCH_DIR, cnnkit_command, emit, fresh_dir, log, machine

IMAGE_SIZE = 64  # the model's input
UPLOAD_SIZE = 128  # the PNG each client sends (resized by the server, as a photo would be)

# ------------------------------------------------------------------------------- Setup


def make_model(folder: Path, onnx: bool) -> Path:
    """A run directory holding an untrained ``fast`` network (or its verified ONNX export)."""
    import torch

    from cnnkit.data.preprocessing import Preprocessing
    from cnnkit.data.shapes import SHAPE_CLASSES
    from cnnkit.model_io import ModelMeta, save_model
    from cnnkit.models import build_network, load_model_spec

    torch.manual_seed(0)
    spec = load_model_spec("fast")
    model = build_network(spec.layers, len(SHAPE_CLASSES), 3, IMAGE_SIZE).eval()
    meta = ModelMeta(
        classes=tuple(SHAPE_CLASSES),
        preprocessing=Preprocessing(
            size=IMAGE_SIZE,
            channels=3,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            resize="crop",
        ),
        architecture=tuple(model.architecture()),
        model_name="fast",
    )
    run = fresh_dir(folder)
    save_model(run, model, meta)
    if not onnx:
        return run
    from cnnkit.export import export_onnx

    return export_onnx(run, check_images=16).path


def upload_png() -> bytes:
    from cnnkit.data.shapes import draw_shape

    buffer = io.BytesIO()
    draw_shape("triangle", UPLOAD_SIZE, np.random.default_rng(0)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_queue: int, log_file: Path) -> subprocess.Popen:
    cmd = [*cnnkit_command(), "serve", str(model), "--port", str(port), "--quiet"]
    cmd += ["--max-queue", str(max_queue)]
    log(f"starting: {' '.join(cmd)}")
    with open(log_file, "w") as err:
        return subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the server has not exited 15 s later."""
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120.0) -> float:
    """Seconds until ``/readyz`` says 200 (model loaded and warmed up)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: the server was not ready after {timeout:.0f}s")


def status_mb(pid: int, field: str) -> float | None:
    """A memory line of a running process's ``/proc/PID/status`` in MB (``VmRSS``: resident
    now, ``VmHWM``: the peak so far), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> float | None:
    """``VmHWM`` of a running process: its peak resident memory so far."""
    return status_mb(pid, "VmHWM")


# ------------------------------------------------------------------------------- Load


async def client(
    http: httpx.AsyncClient, body: bytes, until: float, record: bool, results: dict
) -> None:
    """POST ``body`` again and again until ``until`` (perf_counter seconds)."""
    headers = {"content-type": "image/png"}
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            response = await http.post("/predict", content=body, headers=headers)
            ok = response.status_code == 200 and len(response.json()["predictions"]) == 1
            status = str(response.status_code)
            answer = response.json() if ok else {}
            inference = answer["latency_ms"]["inference"] if ok else None
            batch = answer["model_batch_size"] if ok else None
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            ok, status, inference, batch = False, type(exc).__name__, None, None
        if record:
            results["latency"].append(time.perf_counter() - start)
            results["status"][status] += 1
            results["errors"] += not ok
            if inference is not None:
                results["inference_ms"].append(inference)
                results["model_batch"].append(batch)


async def load(url: str, body: bytes, clients: int, duration: float, warmup: float) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: dict = {"latency": [], "status": Counter(), "errors": 0}
    results |= {"inference_ms": [], "model_batch": []}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(client(http, body, until, False, results) for _ in range(clients)))
        start = time.perf_counter()
        until = start + duration
        await asyncio.gather(*(client(http, body, until, True, results) for _ in range(clients)))
        results["seconds"] = time.perf_counter() - start
    return results


def summarise(results: dict) -> dict:
    latency = np.asarray(results["latency"]) * 1000
    p50, p90, p99 = np.percentile(latency, [50, 90, 99]) if len(latency) else (0, 0, 0)
    inference = results["inference_ms"]
    return {
        "requests": len(latency),
        "errors": results["errors"],
        "statuses": dict(results["status"]),
        "seconds": round(results["seconds"], 2),
        "throughput_rps": round(len(latency) / results["seconds"], 1),
        "latency_ms": {
            "p50": round(float(p50), 2),
            "p90": round(float(p90), 2),
            "p99": round(float(p99), 2),
            "max": round(float(latency.max()), 2) if len(latency) else 0.0,
        },
        "server_inference_ms_p50": round(float(np.median(inference)), 3) if inference else None,
        # images per forward pass the server ran each answer in (requests batched together)
        "server_batch_mean": round(float(np.mean(results["model_batch"])), 2)
        if inference
        else None,
    }


# -------------------------------------------------------------------------------- Main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of timed load")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue")
    parser.add_argument("--onnx", action="store_true", help="serve the ONNX export instead")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s, 1 s warm-up")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0

    info = machine()
    work = BENCH_DIR / "runs-load"
    model = make_model(work / "run", args.onnx)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model, port, args.max_queue, work / "server.log")
    try:
        ready_s = wait_ready(url, server)
        log(f"ready in {ready_s:.1f}s; {args.clients} clients for {args.duration:g}s")
        results = asyncio.run(load(url, upload_png(), args.clients, args.duration, args.warmup))
        rss = peak_rss_mb(server.pid)
    finally:
        stop_server(server)
    summary = summarise(results)
    log(
        f"{summary['requests']} requests, {summary['errors']} errors, "
        f"{summary['throughput_rps']} req/s, p50 {summary['latency_ms']['p50']} ms, "
        f"p99 {summary['latency_ms']['p99']} ms"
    )
    emit(
        {
            "benchmark": "load",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": info,
            "settings": {
                "clients": args.clients,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "server": f"cnnkit serve ({'onnx' if args.onnx else 'run directory'}), "
                f"fast preset {IMAGE_SIZE}x{IMAGE_SIZE}, --max-queue {args.max_queue}",
                "request": f"POST /predict, raw image/png body, {UPLOAD_SIZE}x{UPLOAD_SIZE} PNG",
            },
            "server_ready_s": round(ready_s, 2),
            "server_peak_rss_mb": rss,
            **summary,
        }
    )
    if summary["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
