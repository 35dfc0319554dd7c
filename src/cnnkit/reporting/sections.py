"""The sections of ``report.html``, each built from what ``cnnkit.report`` gathered (``Run``).

A builder raises ``CnnkitError`` when its source is missing; the report then shows why the
section is unavailable instead of failing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.config import RunConfig
from cnnkit.data.dataset import PreparedData
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import EvalResult
from cnnkit.inspection.html import (
    confusion_table,
    esc,
    maps_html,
    model_table,
    per_class_table,
    scores_table,
    table,
)
from cnnkit.inspection.maps import LayerOutput, layer_outputs
from cnnkit.inspection.render import data_uri, display_scale, upscale
from cnnkit.model_io import ModelMeta
from cnnkit.models.network import Network
from cnnkit.plots import kernel_figure, plot_curves
from cnnkit.reporting.verdict import curve_trend, learned
from cnnkit.training.augment import build_augmentation

__all__ = ["BUILDERS", "DATA_SECTIONS", "SECTIONS", "Run", "unavailable"]

SECTIONS = (
    ("summary", "Summary"),
    ("config", "Configuration"),
    ("model", "Model"),
    ("augmented", "Augmented training images"),
    ("curves", "Loss and accuracy"),
    ("confusion", "Confusion matrix"),
    ("per-class", "Per-class precision, recall and F1"),
    ("mistakes", "Most confidently wrong"),
    ("kernels", "First layer kernels"),
    ("feature-maps", "Feature maps of a validation image"),
)
DATA_SECTIONS = ("augmented", "confusion", "per-class", "mistakes", "feature-maps")
AUGMENTED, MISTAKES, MAPS_PER_LAYER = 16, 8, 16
MAX_KERNELS, MAX_KERNEL_INPUTS = 64, 16  # kernels and input channels drawn


@dataclass
class Run:
    """What the report is made from; ``missing`` says why a source is absent."""

    run_dir: Path
    model: Network
    meta: ModelMeta
    config_text: str = ""
    config: RunConfig | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, float]] = field(default_factory=list)
    data: PreparedData | None = None
    evaluation: EvalResult | None = None
    missing: dict[str, str] = field(default_factory=dict)


def unavailable(reason: str) -> str:
    return f"<p class='warn'>Unavailable: {esc(reason)}.</p>"


def _need_data(run: Run) -> PreparedData:
    if run.data is None:
        raise CnnkitError(run.missing.get("data", "no data"))
    return run.data


def _need_evaluation(run: Run) -> EvalResult:
    if run.evaluation is None:
        raise CnnkitError(run.missing.get("evaluation") or run.missing.get("data", "no evaluation"))
    return run.evaluation


def _scored(ev: EvalResult) -> str:
    """What an evaluation scored, for a sentence: the run's validation images, or other data."""
    if ev.is_validation:
        return "validation images"
    return f"images of other data ({ev.scored}), not the run's validation images"


def _img(image: np.ndarray, alt: str, css: str = "") -> str:
    cls = f" class='{css}'" if css else ""
    return f"<img{cls} src='{data_uri(image)}' alt='{esc(alt)}'>"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


# ----------------------------------------------------------------------------- sections


def _summary(run: Run) -> str:
    classes, pre = run.meta.classes, run.meta.preprocessing
    params = sum(p.numel() for p in run.model.parameters())
    facts = [
        ("model", f"{run.meta.model_name or 'custom'}, {params:,} parameters"),
        ("classes", f"{len(classes)}: {', '.join(classes)}"),
        ("input", f"{pre.size}x{pre.size}, {pre.channels} channel(s)"),
    ]
    s = run.summary
    if s:
        facts.append(("epochs", f"{s.get('epochs_run')} (stopped: {s.get('stopped_because')})"))
        facts.append(("time", f"{float(s.get('wall_seconds', 0)):.1f}s on {s.get('device')}"))
    verdicts = _verdicts(run) + _shared_images(run)
    if "data" in run.missing:
        scored = {"confusion", "per-class", "mistakes"} if run.evaluation is not None else set()
        needs = ", ".join(t for k, t in SECTIONS if k in DATA_SECTIONS and k not in scored)
        verdicts.append(
            f"<p class='warn'>Unavailable without the training images ({esc(needs)}): "
            f"{esc(run.missing['data'])}.</p>"
        )
    return table(None, facts) + "".join(verdicts)


def _verdicts(run: Run) -> list[str]:
    """At a glance: did it learn (tested against the majority class)? what next?"""
    out = []
    ev = run.evaluation  # the verdict is about validation images, never about other data
    if ev is not None and ev.count and ev.is_validation:
        test = learned(int(np.trace(ev.confusion)), ev.confusion.sum(1).tolist(), ev.classes)
        if test.significant:
            out.append(f"<p class='good'>The model learned: {esc(test.sentence())}.</p>")
        elif test.accuracy > test.majority_rate:
            out.append(
                "<p class='warn'>Not shown to have learned (the accuracy could be luck): "
                f"{esc(test.sentence())}. More validation images make the test sharper.</p>"
            )
        else:
            out.append(f"<p class='warn'>Training did not work: {esc(test.sentence())}.</p>")
    else:
        best = run.summary.get("best_val_acc")
        if best is None and run.metrics:
            best = max(r.get("val_acc", 0.0) for r in run.metrics)
        if best is None:
            return [unavailable("no validation accuracy recorded")]
        out.append(
            f"<p class='note'>Best validation accuracy {_pct(best)}. Whether that beats always "
            "answering the most common class needs the validation images.</p>"
        )
    if run.metrics:
        trend = curve_trend(run.metrics)
        css = "warn" if trend.kind == "overfitting" else "note"
        out.append(f"<p class='{css}'>{esc(trend.advice)}</p>")
        last = run.metrics[-1]
        gap = last.get("train_acc", 0.0) - last.get("val_acc", 0.0)
        if trend.kind != "overfitting" and gap > 0.15:
            out.append(
                f"<p class='warn'>Training accuracy is {100 * gap:.0f} points above validation "
                "accuracy in the last epoch: the model may be overfitting (more images, "
                "augmentation or dropout help).</p>"
            )
    return out


def _shared_images(run: Run) -> list[str]:
    """Identical images in more than one part of a given split, each named."""
    if run.data is None or not run.data.duplicates:
        return []
    root = Path(run.data.root)
    items = "".join(
        "<li>" + esc(" = ".join(str(Path(p).relative_to(root)) for p in group)) + "</li>"
        for group in run.data.duplicates
    )
    return [
        f"<p class='warn'>{len(run.data.duplicates)} group(s) of identical images of "
        f"{esc(str(root))} lie in more than one split: scores on them are not scores on "
        "unseen images."
        f"</p><ul>{items}</ul>"
    ]


def _config(run: Run) -> str:
    if not run.config_text:
        raise CnnkitError(run.missing.get("config", "config.yaml is missing"))
    note = f"<p class='warn'>{esc(run.missing['config'])}</p>" if "config" in run.missing else ""
    return f"{note}<pre>{esc(run.config_text.strip())}</pre>"


def _model(run: Run) -> str:
    return model_table(run.model)


def _augmented(run: Run) -> str:
    data = _need_data(run)
    assert run.config is not None
    n = min(AUGMENTED, len(data.train))
    idx = np.linspace(0, len(data.train) - 1, num=n).astype(np.int64)
    images, _ = data.train.batch(idx)  # (n, S, S, C) uint8
    x = data.preprocessing.to_model_input(images)
    augment = build_augmentation(run.config.augment)
    if augment is not None:
        with torch.random.fork_rng(devices=[]):  # the same pictures every time
            torch.manual_seed(0)
            x = augment(x)
    mean = torch.tensor(data.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.preprocessing.std).view(1, -1, 1, 1)
    pixels = ((x * std + mean) * 255).clamp(0, 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # (n, S, S, C)
    scale = display_scale(pixels.shape[1], target=96, most=4)
    figures = "".join(
        f"<figure>{_img(upscale(pixels[i], scale), 'augmented training image', 'photo')}"
        f"<figcaption>{esc(data.classes[int(data.train.labels[k])])}</figcaption></figure>"
        for i, k in enumerate(idx)
    )
    what = (
        "as the network saw them: drawn anew each epoch with the run's augmentation"
        if augment is not None
        else "augmentation was off, so the network saw them unchanged"
    )
    return f"<p>{n} training images, {what}.</p><div class='row'>{figures}</div>"


def _curves(run: Run) -> str:
    if not run.metrics:
        raise CnnkitError(f"{run.run_dir / 'metrics.csv'} is missing or empty")
    drawn, metrics = run.run_dir / "curves.png", run.run_dir / "metrics.csv"
    if drawn.is_file() and drawn.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
        uri = data_uri(drawn.read_bytes())  # training drew it from these very metrics
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "curves.png"
            plot_curves(run.metrics, path)
            uri = data_uri(path.read_bytes())
    best = max(run.metrics, key=lambda r: (r.get("val_acc", 0.0), -r["val_loss"]))
    last = run.metrics[-1]
    rows = [
        (name, int(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
         _pct(r.get("train_acc", float("nan"))), _pct(r.get("val_acc", float("nan"))))
        for name, r in (("best", best), ("last", last))
    ]  # fmt: skip
    return f"<img class='photo' src='{uri}' alt='loss and accuracy curves'>" + table(
        ("epoch", "#", "train loss", "val loss", "train acc", "val acc"), rows
    )


def _confusion(run: Run) -> str:
    ev = _need_evaluation(run)
    return (
        f"<p>{ev.count} {esc(_scored(ev))}, accuracy {_pct(ev.accuracy)}, loss {ev.loss:.4f}. "
        "Rows: true class; columns: predicted class; shade: share of the row.</p>"
        + confusion_table(ev.classes, ev.confusion)
    )


def _per_class(run: Run) -> str:
    ev = _need_evaluation(run)
    return (
        "<p>Precision: of the images predicted as the class, the share that are. Recall: of "
        "the class's images, the share found. F1: their harmonic mean.</p>"
        + per_class_table(ev.per_class)
    )


def _mistakes(run: Run) -> str:
    ev = _need_evaluation(run)
    if not ev.most_wrong:
        return f"<p class='good'>None of the {ev.count} {esc(_scored(ev))} was misclassified.</p>"
    meta = run.meta
    where = {p: i for i, p in enumerate(ev.paths)}
    cards = []
    for wrong in ev.most_wrong[:MISTAKES]:
        path = str(wrong["path"])
        try:
            pixels = meta.preprocessing.load_image(path)
            picture = _img(
                upscale(pixels, display_scale(meta.preprocessing.size, 96, 4)), path, "photo"
            )
        except CnnkitError:
            picture = "<p class='note'>(image no longer readable)</p>"
        probs = ev.probabilities[where[path]] if ev.probabilities is not None else None
        lines = (
            "".join(
                f"<br>{esc(c)} {_pct(float(p))}" for c, p in zip(ev.classes, probs, strict=True)
            )
            if probs is not None
            else ""
        )
        cards.append(
            f"<figure class='card'>{picture}<figcaption><b>{esc(Path(path).name)}</b><br>"
            f"true {esc(wrong['true'])}, predicted {esc(wrong['predicted'])}{lines}"
            "</figcaption></figure>"
        )
    return (
        f"<p>The {esc(_scored(ev))} the model got wrong with the most confidence.</p>"
        f"<div class='row'>{''.join(cards)}</div>"
    )


def _kernels(run: Run) -> str:
    conv = next((i for i in run.model.infos if i.spec.type == "conv"), None)
    if conv is None:
        raise CnnkitError("the model has no convolution layer")
    weight = run.model.layers[conv.name].weight.detach().float().cpu().numpy()  # (F, C, k, k)
    shown = weight[:MAX_KERNELS, :MAX_KERNEL_INPUTS]  # (F', C', k, k)
    first = conv is run.model.infos[0]  # its input channels are the image's
    source = (run.meta.weights or {}).get("source")  # pretrained: learnt from far more images
    started = f" They started as the {esc(source)} weights' kernels." if source else ""
    figure = kernel_figure(shown, rgb=first and run.meta.preprocessing.channels == 3)
    count = f"first {len(shown)} of {len(weight)}" if len(shown) < len(weight) else len(weight)
    inputs = (
        f" (its first {shown.shape[1]} of {weight.shape[1]} input channels)"
        if shown.shape[1] < weight.shape[1]
        else ""
    )
    per_channel = (
        "its colour pattern (normalised on its own: the colour it responds to most), then its "
        "red, green and blue weights"
        if figure.columns[0] == "colour"
        else f"its weights for each input channel{inputs}"
        if len(figure.columns) > 1
        else "its weights"
    )
    return (
        f"<p>The {count} kernels of {esc(conv.name)} ({weight.shape[2]}x{weight.shape[3]}), "
        f"numbered. Each shows {per_channel}, on one colour scale for the whole layer centred "
        f"on zero: blue negative, white zero, red positive, from {-figure.limit:.3g} to "
        f"+{figure.limit:.3g} (the bar below).{started}</p>"
        + _img(figure.image, f"kernels of {conv.name}", "photo")
    )


def _feature_maps(run: Run) -> str:
    data = _need_data(run)
    if len(data.val) == 0:
        raise CnnkitError("the run has no validation images")
    pixels = np.asarray(data.val.images[0])  # (S, S, C) uint8
    x = data.preprocessing.to_model_input(torch.from_numpy(pixels[None].copy()))
    outputs = layer_outputs(run.model, x)
    label = data.classes[int(data.val.labels[0])]
    parts = [
        f"<p>{esc(Path(data.val.paths[0]).name)} (class {esc(label)}); each map normalised on "
        "its own (black = its minimum, white = its maximum).</p><div class='row'>"
        f"<figure>{_img(upscale(pixels, display_scale(pixels.shape[0], 96, 4)), 'input', 'photo')}"
        "<figcaption>input</figcaption></figure></div>"
    ]
    parts += [maps_html(out, MAPS_PER_LAYER) for out in outputs if out.is_map]
    parts.append(_class_scores(run, outputs))
    return "\n".join(parts)


def _class_scores(run: Run, outputs: list[LayerOutput]) -> str:
    """The last dense layer's outputs (and the class-sized layers after it), by class name."""
    dense = [k for k, out in enumerate(outputs) if out.type == "dense"]
    classes = run.meta.classes
    if not dense:
        return ""
    probs = torch.softmax(torch.from_numpy(outputs[-1].values), dim=0).numpy()
    parts = []
    for out in outputs[dense[-1] :]:
        if out.is_map or len(out.values) != len(classes):
            continue
        last = out is outputs[-1]
        parts.append(
            f"<h3>{esc(out.name)} ({esc(out.type)}): one score per class"
            + (", softmax gives the probabilities" if last else "")
            + "</h3>"
            + scores_table(classes, out.values.tolist(), probs.tolist() if last else None)
        )
    return "\n".join(parts)


BUILDERS: dict[str, Callable[[Run], str]] = {
    "summary": _summary,
    "config": _config,
    "model": _model,
    "augmented": _augmented,
    "curves": _curves,
    "confusion": _confusion,
    "per-class": _per_class,
    "mistakes": _mistakes,
    "kernels": _kernels,
    "feature-maps": _feature_maps,
}
