"""Hostile inputs made on the spot, small and fast, for the tests and ``bench/attacks.py``."""

from __future__ import annotations

import io

from PIL import Image


def _last_scan(data: bytes) -> tuple[int, int]:
    """Start and end of a baseline-encoded JPEG's last scan (SOS header and its data)."""
    pos, last = 2, (0, 0)
    while pos < len(data):
        assert data[pos] == 0xFF, f"expected a marker at {pos}"
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image
            return last
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] in (0x00, 0xFF) or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 1
                    continue
                break
            last = (pos, end)
        pos = end
    raise AssertionError("no end-of-image marker")


def many_scans_jpeg(size: int = 256, extra_scans: int = 2000) -> bytes:
    """A valid progressive JPEG of a blank ``size`` x ``size`` picture whose last scan is
    repeated ``extra_scans`` times: each copy is about 12 bytes but makes the decoder pass
    over every block again (2,000 copies at 1024x1024: 30 KB, 2.3 s to decode)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 200, 200)).save(
        buffer, "JPEG", progressive=True, quality=90
    )
    data = buffer.getvalue()
    start, end = _last_scan(data)
    return data[:end] + data[start:end] * extra_scans + data[end:]
