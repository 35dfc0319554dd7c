"""``cnnkit train``, ``evaluate``, ``predict`` and ``demo``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cnnkit.cli._app import app, console, one_line_errors, out
from cnnkit.cli._process import heavy_imports
from cnnkit.config import Overrides
from cnnkit.errors import ConfigError, display_path

# ----------------------------------------------------------------------------------- train


# train_cmd's arguments that are not settings of the run (the rest are, by name)
_NOT_SETTINGS = {"data", "out_dir", "strict", "config", "overwrite", "resume", "force", "nproc"}
_NOT_SETTINGS |= {"quiet", "live"}


# (train_cmd is long only for its list of flags, one typer parameter each; its body is short)
@app.command("train")
@one_line_errors
def train_cmd(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Argument(help="Folder: DIR/<class>/* or DIR/train|val/<class>/*")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory to create.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Preset name, YAML file, or auto (chosen from the data).")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw, sgd or muon.")] = None,
    muon_lr: Annotated[
        float | None, typer.Option(help="Muon's step size for convolution filters.")
    ] = None,
    momentum: Annotated[
        float | None, typer.Option(help="SGD's (or, with muon, the filters') momentum.")
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="onecycle, cosine, linear or constant.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, order and weights.")] = None,
    val_split: Annotated[float | None, typer.Option(help="Validation fraction.")] = None,
    target_accuracy: Annotated[float | None, typer.Option(help="Stop at this val acc.")] = None,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without improvement (default 5; 0: never stop).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: the CPUs free to use).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16.")] = None,
    label_smoothing: Annotated[float | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    channels: Annotated[str | None, typer.Option(help="auto, 1 or 3.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Start from imagenet, a .pth/.safetensors file, a URL or a run dir."),
    ] = None,
    freeze_epochs: Annotated[
        int | None,
        typer.Option(help="With --weights: first epochs train the new head alone (cached)."),
    ] = None,
    backbone_lr_factor: Annotated[
        float | None, typer.Option(help="After them: the backbone's share of the lr.")
    ] = None,
    freeze_bn: Annotated[
        bool | None,
        typer.Option("--freeze-bn/--no-freeze-bn", help="Keep the weights' batchnorm statistics."),
    ] = None,
    resize: Annotated[str | None, typer.Option(help="crop, squash or pad.")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment")] = None,
    hflip: Annotated[bool | None, typer.Option("--hflip/--no-hflip")] = None,
    vflip: Annotated[bool | None, typer.Option("--vflip/--no-vflip")] = None,
    shear: Annotated[float | None, typer.Option(help="Max skew, degrees.")] = None,
    rotate: Annotated[float | None, typer.Option(help="Max rotation, degrees.")] = None,
    scale: Annotated[float | None, typer.Option(help="Max zoom, fraction.")] = None,
    translate: Annotated[float | None, typer.Option(help="Max shift, fraction.")] = None,
    strict: Annotated[bool, typer.Option(help="Unreadable images are an error.")] = False,
    config: Annotated[
        Path | None, typer.Option(help="YAML with model/data/train sections.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the run cnnkit wrote in --out (nothing else).")
    ] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory from its checkpoint.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Resume even if data or config changed.")] = False,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Also checkpoint every N steps (always each epoch).")
    ] = None,
    deterministic: Annotated[
        bool | None, typer.Option("--deterministic", help="Deterministic kernels (exact resume).")
    ] = None,
    ema: Annotated[float | None, typer.Option(help="Average weights, e.g. 0.99.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta", help="Mirror test-time average.")] = None,
    sync_bn: Annotated[bool | None, typer.Option("--sync-bn", help="Sync batchnorm (GPU).")] = None,
    nproc: Annotated[
        int | None, typer.Option(help="Launch N data-parallel processes through torchrun.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Only warnings and the result.")] = False,
    live: Annotated[
        bool, typer.Option("--live", help="Watch it in the browser (127.0.0.1, a free port).")
    ] = False,
) -> None:
    """Train a CNN on a folder of images and write a run directory."""
    with heavy_imports():
        from cnnkit.training.outputs import stop_message
        from cnnkit.training.plan import plan_run
        from cnnkit.workflow import train_and_report

    if nproc is not None:
        from cnnkit.training.distributed import launch_torchrun

        raise typer.Exit(launch_torchrun(nproc, _without_nproc(sys.argv[1:])))
    if resume is not None:
        if out_dir is not None and out_dir != resume:
            raise ConfigError("--resume names the run directory; leave out --out")
        out_dir = resume
    elif data is None or out_dir is None:
        raise ConfigError("train needs a DATA folder and --out RUN_DIR (or --resume RUN_DIR)")
    # Every option named as its setting (--epochs: epochs), typed as typer parsed it.
    given = {k: v for k, v in ctx.params.items() if k not in _NOT_SETTINGS}
    overrides = Overrides.of(path=data, strict=strict or None, **given)
    plan = plan_run(overrides, file=config, resume=resume)
    trained = train_and_report(
        plan,
        out_dir,
        overwrite=overwrite,
        progress=not quiet,
        resume=resume is not None,
        force=force,
        live=live,
    )
    if not trained.reports:
        return  # under torchrun only rank 0 reports
    result = trained.result
    s = result.summary()
    out.print(
        f"best validation accuracy {100 * result.best_val_acc:.2f}% (epoch "
        f"{result.best_epoch} of {result.epochs_run}), {s['wall_seconds']:.1f}s, "
        f"{s['images_per_second']:,.0f} img/s; run directory {out_dir}",
        markup=False,
    )
    stopped = stop_message(result.stopped_because, result.best_val_acc, plan.config.train.patience)
    if stopped:
        out.print(stopped, markup=False)
    if trained.report is not None:
        out.print(f"report: {trained.report}", markup=False)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N`` (torchrun's workers get the rest)."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return rest


# ------------------------------------------------------------------------ evaluate, predict


@app.command("evaluate")
@one_line_errors
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    data: Annotated[Path, typer.Argument(help="A labelled folder data set.")],
    split: Annotated[
        str,
        typer.Option(
            help="auto (the run's validation part of its own folder, all of another), "
            "all, train, val or test."
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    quiet: Annotated[bool, typer.Option(help="Only warnings and the result.")] = False,
) -> None:
    """Accuracy, per-class precision/recall/F1, confusion matrix, most confident mistakes."""
    with heavy_imports():
        from cnnkit.evaluation import evaluate

    result = evaluate(run_dir, data, split)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(f"{result.scored}: {result.count} images", markup=False)
    print_evaluation(result)
    out.print(f"results: {result.saved_to}/ (evaluation.json, confusion_matrix.png)", markup=False)


def print_evaluation(result: Any) -> None:
    """Accuracy, the per-class table, the confusion matrix and the worst mistakes."""
    out.print(
        f"accuracy {100 * result.accuracy:.2f}% on {result.count} images (loss {result.loss:.4f})"
    )
    from rich.table import Table

    scores = Table(title="per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        scores.add_column(col, justify="left" if col == "class" else "right")
    for row in result.per_class:
        scores.add_row(
            row["class"],
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    out.print(scores)
    matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
    matrix.add_column("")
    for name in result.classes:
        matrix.add_column(name, justify="right")
    for name, row in zip(result.classes, result.confusion, strict=True):
        matrix.add_row(name, *(str(int(v)) for v in row))
    out.print(matrix)
    for w in result.most_wrong:
        out.print(
            f"wrong: {display_path(str(w['path']))} is {w['true']}, predicted {w['predicted']} "
            f"({100 * w['confidence']:.1f}%)",
            markup=False,
        )


@app.command("predict")
@one_line_errors
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, or an exported .onnx or .pt2.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    top_k: Annotated[int, typer.Option(help="Classes to show per image.")] = 3,
) -> None:
    """Class and probabilities for each image, preprocessed exactly as in training."""
    from cnnkit.errors import ImageError

    with heavy_imports():
        from cnnkit.export import load_predictor
        from cnnkit.inference import expand_inputs

    if top_k < 1:
        raise ConfigError(f"--top-k: expected a positive integer, got {top_k}")
    classifier = load_predictor(run_dir)
    files = expand_inputs(images)
    failed = 0
    writer = csv.writer(sys.stdout) if as_csv else None
    if writer:
        writer.writerow(["path", "label", "confidence", *[f"p_{c}" for c in classifier.classes]])
    for path in files:
        try:
            (pred,) = classifier.predict([path])
        except ImageError as exc:
            console.print(f"error: {exc}", markup=False, soft_wrap=True)
            failed += 1
            continue
        if writer:
            writer.writerow(
                [
                    display_path(pred.source),
                    pred.label,
                    f"{pred.confidence:.6f}",
                    *[f"{pred.probabilities[c]:.6f}" for c in classifier.classes],
                ]
            )
        elif as_json:
            out.print(json.dumps(pred.to_dict(top_k)), markup=False)
        else:
            top = ", ".join(f"{c} {100 * p:.1f}%" for c, p in pred.top(top_k))
            out.print(f"{display_path(pred.source)}: {pred.label} ({top})", markup=False)
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ demo


@app.command("demo")
@one_line_errors
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/demo"),
    quiet: Annotated[bool, typer.Option(help="Only warnings and the result.")] = False,
) -> None:
    """Generate the shapes, train the default model, evaluate it and predict a new image."""
    from cnnkit.demo import run_demo

    report = run_demo(out_dir, progress=not quiet)
    print_evaluation(report.evaluation)
    out.print(
        f"a new {report.new_shape}: predicted {report.prediction.label} "
        f"({100 * report.prediction.confidence:.1f}%)"
    )
    out.print(
        f"validation accuracy {100 * report.evaluation.accuracy:.2f}% after "
        f"{report.train.epochs_run} epochs in {report.seconds:.1f}s"
    )
    out.print(
        f"outputs: {out_dir}/ (model.safetensors, metrics.csv, curves.png, "
        "confusion_matrix.png, summary.json, report.html)"
    )
