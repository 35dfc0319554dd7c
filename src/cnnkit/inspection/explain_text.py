"""The worked examples as text, laid out the way the learning material writes them."""

from __future__ import annotations

import numpy as np

from cnnkit.inspection.explain import (
    ConvExplanation,
    ConvStep,
    PoolExplanation,
    format_matrix,
    format_number,
)

__all__ = ["DEFAULT_STEPS", "render_conv", "render_pool", "side_by_side"]

DEFAULT_STEPS = 2  # the material writes out the first two positions


def side_by_side(left: np.ndarray, right: np.ndarray, sign: str, indent: str = "  ") -> list[str]:
    """Two matrices next to each other with ``sign`` between them on the middle row."""
    a, b = format_matrix(left).splitlines(), format_matrix(right).splitlines()
    rows = max(len(a), len(b))
    a += [" " * len(a[0])] * (rows - len(a))
    b += [""] * (rows - len(b))
    middle = (rows - 1) // 2
    gap = " " * (len(sign) + 2)
    return [
        f"{indent}{x}  {sign if i == middle else gap[: len(sign)]}  {y}".rstrip()
        for i, (x, y) in enumerate(zip(a, b, strict=True))
    ]


def _span(start: int, length: int) -> str:
    return f"{start + 1}" if length == 1 else f"{start + 1}-{start + length}"


def _conv_step(number: int, step: ConvStep, source: str) -> list[str]:
    kh, kw = step.kernel.shape
    r, c = step.origin
    i, j = step.position
    lines = [
        f"Step {number}: the kernel over rows {_span(r, kh)}, columns {_span(c, kw)} of "
        f"{source} -> result row {i + 1}, column {j + 1}",
        *side_by_side(step.window, step.kernel, "x"),
    ]
    terms = [f"({format_number(p)} x {format_number(w)})" for p, w in step.terms]
    rows = [" + ".join(terms[k : k + kw]) for k in range(0, len(terms), kw)]
    for k, row in enumerate(rows):
        lead = "  = " if k == 0 else "    "
        tail = " +" if k < len(rows) - 1 else ""
        lines.append(f"{lead}{row}{tail}")
    lines.append(f"  = {format_number(step.sum)}")
    return lines


def render_conv(ex: ConvExplanation, all_steps: bool = False) -> str:
    """Image, kernel, the weighted sums term by term, then every matrix aligned."""
    h, w = ex.image.shape
    kh, kw = ex.kernel.shape
    out = [f"Image ({h}x{w}):", format_matrix(ex.image, "  "), ""]
    out += [f"Kernel ({kh}x{kw}):", format_matrix(ex.kernel, "  "), ""]
    source = "the image"
    if ex.padding == "zero":
        ph, pw = ex.input.shape
        out += [
            f"Zero padding: the image framed with zeros ({ph}x{pw}), so every pixel gets a value:",
            format_matrix(ex.input, "  "),
            "",
        ]
        source = "the padded image"
    out.append(
        f"Each step lays the kernel over a {kh}x{kw} patch, multiplies the values under each "
        f"weight and adds them up; then it moves {ex.stride} pixel{'s' if ex.stride > 1 else ''}."
    )
    shown = ex.steps if all_steps else ex.steps[:DEFAULT_STEPS]
    for n, step in enumerate(shown, start=1):
        out += ["", *_conv_step(n, step, source)]
    hidden = len(ex.steps) - len(shown)
    if hidden:
        out += ["", f"... {hidden} more positions the same way (--all-steps shows them)."]
    ho, wo = ex.result.shape
    out += ["", f"Result ({ho}x{wo}), one weighted sum per position:"]
    out += [format_matrix(ex.result, "  ")]
    if ex.padding == "border":
        ph, pw = ex.padded.shape
        out += [
            "",
            f"Feature map ({ph}x{pw}): the kernel does not fit at the edge, so the edge "
            f"gets the padding value {format_number(ex.pad_value)}:",
            format_matrix(ex.padded, "  "),
        ]
    if ex.relu is not None:
        out += [
            "",
            "After ReLU (negative values set to 0):",
            format_matrix(ex.relu, "  "),
        ]
    return "\n".join(out)


def render_pool(ex: PoolExplanation, all_steps: bool = False) -> str:
    """The map, each window and its maximum, then the pooled map."""
    h, w = ex.feature_map.shape
    s = ex.size
    out = [f"Feature map ({h}x{w}):", format_matrix(ex.feature_map, "  "), ""]
    out.append(
        f"Max pooling keeps the largest value of each {s}x{s} window, moving {ex.stride} "
        f"pixel{'s' if ex.stride > 1 else ''} at a time:"
    )
    default_shown = max(DEFAULT_STEPS, min(len(ex.steps), 9))
    shown = ex.steps if all_steps else ex.steps[:default_shown]
    for n, step in enumerate(shown, start=1):
        r, c = step.origin
        out += [
            "",
            f"Window {n}: rows {_span(r, s)}, columns {_span(c, s)}",
            *[f"  {line}" for line in format_matrix(step.window).splitlines()],
            f"  max = {format_number(step.max)}",
        ]
    hidden = len(ex.steps) - len(shown)
    if hidden:
        out += ["", f"... {hidden} more windows the same way (--all-steps shows them)."]
    ho, wo = ex.result.shape
    out += [
        "",
        f"Pooled map ({ho}x{wo}): {h * w} values reduced to {ho * wo}:",
        format_matrix(ex.result, "  "),
    ]
    return "\n".join(out)
