"""Count the scans of a JPEG before decoding it: the work a decode takes is pixels x scans.

A progressive JPEG codes its pixels in several scans, and libjpeg passes over every block of
the image once per scan. A normal file has about ten; a hostile one repeats a 12-byte scan
thousands of times, so 286 KB took 23 s to decode. ``count_scans`` finds the scans the way
libjpeg does (marker segments skipped by their length, entropy-coded data up to the next
marker) without decoding anything, so the caller can refuse such a file first.
"""

from __future__ import annotations

import re

__all__ = ["count_scans"]

SOS = 0xDA  # start of scan
EOI = 0xD9  # end of image
PARAMETERLESS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length
# The next marker after entropy-coded data: 0xFF followed by anything but a stuffed zero,
# a fill byte or a restart marker (which libjpeg skips over as well).
NEXT_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def count_scans(data: bytes, stop_after: int) -> int:
    """The number of start-of-scan markers of JPEG ``data``, counting no further than
    ``stop_after + 1`` (enough to tell that a file has too many). Damaged data is counted as
    far as it goes: the decoder reports the damage itself."""
    pos, scans, size = 2, 0, len(data)  # after the SOI marker
    while pos + 1 < size:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            found = NEXT_MARKER.search(data, pos)  # fill bytes or garbage: skipped as libjpeg does
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == EOI:
            break
        if marker in PARAMETERLESS:
            pos += 2
            continue
        if pos + 4 > size:
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == SOS:
            scans += 1
            if scans > stop_after:
                break
            found = NEXT_MARKER.search(data, pos)  # skip the scan's entropy-coded data
            if found is None:
                break
            pos = found.start()
    return scans
