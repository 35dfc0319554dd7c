"""Attacks: the server attacks of issue 13 replayed against a real ``cnnkit serve`` on loopback.

The server is ``cnnkit serve`` in its own process on 127.0.0.1 at a free port, with a bearer
token, serving the ``fast`` preset at 64x64 (untrained: refusals do not depend on accuracy),
``--header-timeout 5 --body-timeout 5`` so the slow attacks end within seconds. While the
attacks run, a prober asks ``GET /healthz`` on a new connection every 50 ms, as an
orchestrator would. The attacks, one after another, each bounded in count and time:

- ``scans``: 5 progressive JPEGs of 1024x1024 with 2,000 repeated scans (30 KB each): 413
- ``big_pngs``: 3 concurrent requests of 16 blank 4096x4096 RGBA PNGs (1 MB each): 413
- ``stalled_headers``: 200 sockets that send half a request line and headers, then nothing:
  the server closes each (with a 408, or a reset once its place is taken)
- ``half_body``: 20 requests that announce 100,000 bytes and send 10: 408
- ``garbage``: 40 malformed requests (random bytes, a 20 KB header, a bad Content-Length, a
  bad method, a body on GET): a 4xx or the connection closed, never a 5xx or silence
- ``wrong_token``: 40 requests with no, a wrong or a malformed token: 401

Then 3 concurrent requests of the largest legal size (2 blank 4096x4096 RGBA PNGs each,
33.5 MP: the per-request limit) are answered (200, or 503 while the memory budget is busy).

Prints one JSON object: per attack how many were refused as expected out of how many, the
server's peak RSS (``VmHWM``) and its RSS after the attacks, and ``/healthz`` during the
attacks: count, statuses, p50/p99/max latency. The clients share the cores with the server.
``--quick`` (a smoke run): 2 s timeouts, 50 stalled sockets, 5 half bodies, no legal-size
requests. Usage::

    .venv/bin/python bench/attacks.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchlib import BENCH_DIR, REPO, cnnkit_command, emit, log, machine
from load import free_port, make_model, peak_rss_mb, status_mb, stop_server, wait_ready

sys.path.insert(0, str(REPO / "tests"))
from hostile_files import many_scans_jpeg

TOKEN = "bench-attacks-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 5.0  # the server's header and body timeouts here (2 with --quick)
STALLED = 200  # sockets (50 with --quick)
HALF_BODIES = 20  # (5 with --quick)


def blank_png(size: int = 4096) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (size, size)).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ attacks


async def post_files(http: httpx.AsyncClient, files: list[bytes], headers: dict) -> int:
    form = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(files)]
    try:
        return (await http.post("/predict", files=form, headers=headers)).status_code
    except httpx.HTTPError:
        return 0


async def scans(http: httpx.AsyncClient) -> tuple[int, int]:
    body = many_scans_jpeg(1024, 2000)
    headers = {**AUTH, "content-type": "image/jpeg"}
    codes = [
        (await http.post("/predict", content=body, headers=headers)).status_code for _ in range(5)
    ]
    return sum(c == 413 for c in codes), len(codes)


async def big_pngs(http: httpx.AsyncClient, png: bytes) -> tuple[int, int]:
    codes = await asyncio.gather(*(post_files(http, [png] * 16, AUTH) for _ in range(3)))
    return sum(c == 413 for c in codes), len(codes)


async def raw_exchange(port: int, data: bytes, wait_s: float) -> bytes | None:
    """Send ``data`` and read until the server closes; None if it never does in ``wait_s``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with bytes unread: closed all the same
    except TimeoutError:
        return None
    finally:
        writer.close()
    return answer


async def stalled_headers(port: int) -> tuple[int, int]:
    partial = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    answers = await asyncio.gather(
        *(raw_exchange(port, partial, TIMEOUT_S + 10) for _ in range(STALLED))
    )
    closed = [a for a in answers if a is not None and (a == b"" or a.startswith(b"HTTP/1.1 408"))]
    return len(closed), len(answers)


async def half_body(port: int) -> tuple[int, int]:
    request = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
        b"\x89PNG\r\n\x1a\n\x00\x00"
    )
    answers = await asyncio.gather(
        *(raw_exchange(port, request, TIMEOUT_S + 10) for _ in range(HALF_BODIES))
    )
    return sum(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), len(answers)


def garbage_requests() -> list[bytes]:
    """40 requests no HTTP server should take: each must get a 4xx or a closed connection."""
    rng = np.random.default_rng(0)
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    head = b"Host: x\r\nConnection: close\r\n"
    big = b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    chunked = b"Transfer-Encoding: chunked\r\nContent-Type: image/png\r\n\r\nzz\r\n"
    html = b"Content-Type: text/html\r\nContent-Length: 2\r\n\r\nhi"
    requests = [rng.integers(0, 256, 300, dtype=np.uint8).tobytes() for _ in range(10)]
    requests += [b"GET /healthz HTTP/1.1\r\n" + head + big] * 5
    requests += [b"POST /predict HTTP/1.1\r\n" + head + b"Content-Length: -5\r\n\r\n"] * 5
    requests += [b"BREW /predict HTTP/1.1\r\n" + head + auth + b"\r\n"] * 5
    requests += [b"POST /predict HTTP/1.1\r\n" + head + auth + chunked] * 5
    requests += [b"POST /predict HTTP/1.1\r\n" + head + auth + html] * 5
    requests += [b"GET /../../etc/passwd HTTP/1.1\r\n" + head + b"\r\n"] * 5
    return requests


async def garbage(port: int) -> tuple[int, int]:
    async def one(data: bytes) -> bool:
        answer = await raw_exchange(port, data, 2 * TIMEOUT_S)
        if answer is None:  # never answered, never closed
            return False
        status = answer[9:12]
        return answer == b"" or (status.startswith(b"4") and len(status) == 3)

    results = await asyncio.gather(*(one(r) for r in garbage_requests()))
    return sum(results), len(results)


async def wrong_token(http: httpx.AsyncClient) -> tuple[int, int]:
    variants = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}]
    variants.append({"authorization": f"Bearer {TOKEN[:-1]}"})
    codes = []
    for i in range(40):
        headers = variants[i % len(variants)]
        path = "/model" if i % 2 else "/predict"
        response = await (
            http.get(path, headers=headers)
            if i % 2
            else http.post(
                path, content=b"\x89PNG", headers={**headers, "content-type": "image/png"}
            )
        )
        codes.append(response.status_code)
    return sum(c == 401 for c in codes), len(codes)


async def largest_legal(http: httpx.AsyncClient, png: bytes) -> dict[str, int]:
    codes = await asyncio.gather(*(post_files(http, [png] * 2, AUTH) for _ in range(3)))
    return dict(Counter(str(c) for c in codes))


# ------------------------------------------------------------------------------- prober


async def probe(url: str, stop: asyncio.Event, results: dict) -> None:
    """GET /healthz on a new connection every 50 ms until ``stop``."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status = str((await http.get("/healthz")).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results["latency"].append(time.perf_counter() - start)
            results["status"][status] += 1
            await asyncio.sleep(0.05)


async def attack(url: str, port: int, pid: int, quick: bool) -> dict:
    png = blank_png()
    stop = asyncio.Event()
    health: dict = {"latency": [], "status": Counter()}
    prober = asyncio.create_task(probe(url, stop, health))
    refused: dict = {}
    timings: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        steps = [
            ("scans", scans(http)),
            ("big_pngs", big_pngs(http, png)),
            ("stalled_headers", stalled_headers(port)),
            ("half_body", half_body(port)),
            ("garbage", garbage(port)),
            ("wrong_token", wrong_token(http)),
        ]
        for name, step in steps:
            start = time.perf_counter()
            ok, expected = await step
            timings[name] = round(time.perf_counter() - start, 2)
            refused[name] = {"refused_correctly": ok, "expected": expected}
            log(f"{name}: {ok}/{expected} refused as expected in {timings[name]}s")
        legal = {} if quick else await largest_legal(http, png)
        log(f"3 concurrent requests of the largest legal size: {legal}")
        # a small request waits in line behind any work still running (after a 504):
        # once it is answered the worker is idle and has given its memory back
        small = {**AUTH, "content-type": "image/png"}
        await http.post("/predict", content=blank_png(64), headers=small, timeout=120)
    stop.set()
    await prober
    latency = np.asarray(health["latency"]) * 1000
    return {
        "refused": refused,
        "seconds": timings,
        "largest_legal_requests_x3": legal,
        "healthz_during_attacks": {
            "probes": len(latency),
            "statuses": dict(health["status"]),
            "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p99_ms": round(float(np.percentile(latency, 99)), 1),
            "max_ms": round(float(latency.max()), 1),
        },
        "server_rss_after_mb": status_mb(pid, "VmRSS"),
    }


def unbounded_decode_s() -> float:
    """Seconds Pillow alone takes to decode one ``scans`` JPEG: the work cnnkit refuses."""
    from PIL import Image

    start = time.perf_counter()
    Image.open(io.BytesIO(many_scans_jpeg(1024, 2000))).load()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    global TIMEOUT_S, STALLED, HALF_BODIES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer, shorter attacks")
    args = parser.parse_args()
    if args.quick:
        TIMEOUT_S, STALLED, HALF_BODIES = 2.0, 50, 5
    info = machine()
    work = BENCH_DIR / "runs-attacks"
    model = make_model(work / "run", onnx=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*cnnkit_command(), "serve", str(model), "--port", str(port), "--quiet"]
    cmd += ["--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S)]
    log(f"starting: {' '.join(cmd)} (token in CNNKIT_TOKEN)")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "server.log", "w") as err:
        env = {**__import__("os").environ, "CNNKIT_TOKEN": TOKEN}
        server = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env)
    started = time.perf_counter()
    try:
        wait_ready(url, server)
        idle_rss = status_mb(server.pid, "VmRSS")
        result = asyncio.run(
            asyncio.wait_for(attack(url, port, server.pid, args.quick), timeout=120)
        )
        peak = peak_rss_mb(server.pid)
    finally:
        stop_server(server)
    total = sum(r["refused_correctly"] for r in result["refused"].values())
    expected = sum(r["expected"] for r in result["refused"].values())
    log(
        f"{total}/{expected} refused as expected; peak RSS {peak} MB; healthz p99 "
        f"{result['healthz_during_attacks']['p99_ms']} ms"
    )
    emit(
        {
            "benchmark": "attacks",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": info,
            "settings": {
                "server": f"cnnkit serve, fast preset 64x64, --token, --header-timeout "
                f"{TIMEOUT_S:g} --body-timeout {TIMEOUT_S:g}, other limits at their defaults",
                "prober": "GET /healthz on a new connection every 50 ms",
            },
            "refused_correctly": total,
            "expected": expected,
            "server_idle_rss_mb": idle_rss,
            "server_peak_rss_mb": peak,
            **result,
            "scans_jpeg_unbounded_pillow_decode_s": unbounded_decode_s(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    if total != expected:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
