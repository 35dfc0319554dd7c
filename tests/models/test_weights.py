"""Starting weights (``--weights``): published (package or download), files, URLs, run
directories; key mapping, refusals, what a run records. Downloads go to a server on 127.0.0.1
that this file starts; nothing touches the network."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import ConfigError, WeightsError
from cnnkit.models import build_network, load_model_spec
from cnnkit.models.weights import load_pretrained, plan_weights

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY_LAYERS = [
    {"conv": {"name": "conv1", "filters": 4, "kernel": 3, "stride": 2, "bias": False}},
    {"batchnorm": {"name": "bn1"}},
    {"relu": {"name": "relu"}},
    {"sequence": {"name": "layer1", "layers": [{"basic_block": {"filters": 8, "stride": 2}}]}},
    {"gap": {"name": "avgpool"}},
    {"dense": {"name": "fc"}},
]


class Server:
    """Serves ``files`` (path -> bytes) with HTTP Range support; records what was asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # send only this many bytes once, then hang up
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if server.cut_after is not None:
                    part, server.cut_after = part[: server.cut_after], None
                self.wfile.write(part)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _published_state(classes: int = 10) -> dict[str, torch.Tensor]:
    """Weights of the tiny network in torchvision's layout (no ``layers.`` prefix)."""
    torch.manual_seed(7)
    net = build_network(_spec_layers(), classes, 3, 16)
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1, 1)
    return {k.removeprefix("layers."): v.clone() for k, v in net.state_dict().items()}


def _spec_layers():
    from cnnkit.models import parse_layers

    return parse_layers(TINY_LAYERS)


def _pth_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture
def published(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch):
    """A preset file whose imagenet weights live at an official-looking URL; the mirror
    setting points it at the loopback server. Returns (model file, state, file name)."""
    state = _published_state()
    body = _pth_bytes(state)
    name = f"tinynet-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/models/{name}"] = body
    entry = {"url": f"https://weights.example.invalid/models/{name}", "mean": MEAN, "std": STD}
    model = tmp_path / "tinynet.yaml"
    spec = {"name": "tinynet", "input_size": 16, "pretrained": {"imagenet": entry}}
    model.write_text(yaml.safe_dump({**spec, "layers": TINY_LAYERS}))
    monkeypatch.setenv("CNNKIT_WEIGHTS_URL", f"{server.url}/models")
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))  # this test's own
    return model, state, name


def _assert_loaded(net, state: dict, head: bool) -> None:
    ours = net.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") and not head:
            continue
        assert torch.equal(ours[f"layers.{key}"], value), key


def _cache() -> Path:
    import os

    return Path(os.environ["CNNKIT_CACHE_DIR"]) / "weights"


# ------------------------------------------------------------------------- downloads


def test_published_weights_download_once_into_the_cache(published, server, caplog) -> None:
    model, state, name = published
    spec = load_model_spec(str(model))
    plan = plan_weights("imagenet", spec)
    assert plan.preprocessing.mean == tuple(MEAN) and plan.preprocessing.size == 16
    net = build_network(spec.layers, 3, 3, 16)
    with caplog.at_level("INFO", logger="cnnkit"):
        loaded = load_pretrained(net, plan, progress=False)
    assert loaded.new_head == "10 outputs in the weights, 3 classes here"
    assert "the classification layer (fc) is new" in caplog.text
    _assert_loaded(net, state, head=False)
    assert (_cache() / name).is_file() and loaded.sha256.startswith(name[8:16])
    again = load_pretrained(build_network(spec.layers, 10, 3, 16), plan, progress=False)
    assert server.requests == [(f"/models/{name}", None)]  # the second came from the cache
    assert again.new_head is None and again.sha256 == loaded.sha256


def test_a_partial_download_is_resumed_with_a_range_request(published, server) -> None:
    model, _, name = published
    body = server.files[f"/models/{name}"]
    _cache().mkdir(parents=True, exist_ok=True)
    (_cache() / f"{name}.partial").write_bytes(body[:1000])
    spec = load_model_spec(str(model))
    load_pretrained(build_network(spec.layers, 10, 3, 16), plan_weights("imagenet", spec))
    assert server.requests == [(f"/models/{name}", "bytes=1000-")]
    assert (_cache() / name).read_bytes() == body
    assert not (_cache() / f"{name}.partial").exists()


def test_a_broken_download_keeps_what_arrived_for_the_next_try(published, server) -> None:
    model, state, name = published
    server.cut_after = 2000
    spec = load_model_spec(str(model))
    plan = plan_weights("imagenet", spec)
    with pytest.raises(WeightsError, match="broke off after 2,000 bytes"):
        load_pretrained(build_network(spec.layers, 10, 3, 16), plan, progress=False)
    net = build_network(spec.layers, 10, 3, 16)
    load_pretrained(net, plan, progress=False)
    assert server.requests[-1] == (f"/models/{name}", "bytes=2000-")
    _assert_loaded(net, state, head=True)


def test_a_file_whose_hash_differs_from_its_name_is_refused(published, server) -> None:
    model, _, name = published
    server.files[f"/models/{name}"] = _pth_bytes(_published_state(classes=11))
    spec = load_model_spec(str(model))
    with pytest.raises(WeightsError, match=r"sha256 is [0-9a-f]{16}\.\.\., its name says"):
        load_pretrained(build_network(spec.layers, 3, 3, 16), plan_weights("imagenet", spec))
    assert not list(_cache().iterdir())  # nothing kept


def test_offline_fails_at_once_naming_the_url_and_the_way_round(
    published, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, name = published
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CNNKIT_WEIGHTS_URL", f"http://127.0.0.1:{port}/models")
    spec = load_model_spec(str(model))
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_network(spec.layers, 3, 3, 16), plan_weights("imagenet", spec))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/models/{name} (")
    assert f"fetch that file elsewhere and pass it: train.weights /path/to/{name}" in message


# ------------------------------------------------------------------------- packaged


def test_efficientnet_lite0_imagenet_equals_the_reference_implementation() -> None:
    """The mapped package weights in cnnkit's network give the reference's outputs."""
    from efficientnet_lite_pytorch import EfficientNet

    spec = load_model_spec("efficientnet_lite0")
    plan = plan_weights("imagenet", spec)
    assert plan.location.endswith("efficientnet-lite0-57934424.pth")
    net = build_network(spec.layers, 1000, 3, 224).eval()
    loaded = load_pretrained(net, plan, progress=False)
    assert loaded.new_head is None and loaded.sha256.startswith("57934424")
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    reference.load_state_dict(torch.load(plan.location, weights_only=True))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = net(x), reference.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.abs().max() > 1  # real logits, not a degenerate output


# ------------------------------------------------------------------------- timm's layout

# timm's EfficientNet family numbers blocks by stage: blocks.STAGE.I (its efficientnet.py).
TIMM_STAGES = {"efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1], "mobilenet_v2": [1, 2, 3, 4, 3, 3, 1]}


def _timm_block(n: int, stages: list[int]) -> str:
    """The n-th block (0-based, all stages in order) as timm names it."""
    for stage, count in enumerate(stages):
        if n < count:
            return f"blocks.{stage}.{n}"
        n -= count
    raise IndexError(n)


def _reference_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite reference's keys renamed as timm's tf_efficientnet_lite0."""
    out = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\._(\w+?)\.(.+)$", key):
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            expanded = f"_blocks.{n}._expand_conv.weight" in state
            names = (
                {"expand_conv": "conv_pw", "bn0": "bn1", "depthwise_conv": "conv_dw",
                 "bn1": "bn2", "project_conv": "conv_pwl", "bn2": "bn3"}
                if expanded
                else {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw",
                      "bn2": "bn2"}
            )  # fmt: skip
            out[f"{_timm_block(n, TIMM_STAGES['efficientnet_lite0'])}.{names[part]}.{rest}"] = value
        else:
            top, _, rest = key.partition(".")
            names = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                     "_bn1": "bn2", "_fc": "classifier"}  # fmt: skip
            out[f"{names[top]}.{rest}"] = value
    return out


def test_a_timm_efficientnet_lite0_file_equals_the_reference_implementation(tmp_path) -> None:
    """The reference weights saved in timm's layout load into the preset and give the
    reference's outputs; a key the preset has no place for (squeeze-excitation) is named."""
    from efficientnet_lite_pytorch import EfficientNet

    spec = load_model_spec("efficientnet_lite0")
    location = plan_weights("imagenet", spec).location
    reference_state = torch.load(location, weights_only=True)
    timm_state = _reference_to_timm(reference_state)
    assert "blocks.6.0.conv_pwl.weight" in timm_state and "blocks.0.0.conv_pw.weight" in timm_state
    path = tmp_path / "tf_efficientnet_lite0.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    net = build_network(spec.layers, 1000, 3, 224).eval()
    loaded = load_pretrained(net, plan_weights(str(path), spec), progress=False)
    assert loaded.new_head is None and loaded.tensors == len(timm_state)
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    reference.load_state_dict(reference_state)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference.eval()(x), rtol=0, atol=1e-4)

    timm_state["blocks.1.0.se.conv_reduce.weight"] = torch.zeros(4, 96, 1, 1)
    torch.save(timm_state, tmp_path / "with_se.pth")
    with pytest.raises(
        WeightsError, match=r"unexpected 1 \(blocks\.1\.0\.se\.conv_reduce\.weight\)"
    ):
        load_pretrained(net, plan_weights(str(tmp_path / "with_se.pth"), spec), progress=False)


def test_a_timm_mobilenetv2_file_loads_every_tensor_where_torchvision_has_it(tmp_path) -> None:
    spec = load_model_spec("mobilenet_v2")
    torch.manual_seed(3)
    source = build_network(spec.layers, 1000, 3, 32)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(-1, 1)
    torchvision_state = {k.removeprefix("layers."): v for k, v in source.state_dict().items()}
    timm_state = {}
    for key, value in torchvision_state.items():
        if m := re.match(
            r"features\.(\d+)\.conv\.([\d.]+?)\.(weight|bias|running_\w+|num_\w+)$", key
        ):
            n, where, rest = int(m.group(1)), m.group(2), m.group(3)
            names = (
                {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
                if n == 1
                else {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2",
                      "2": "conv_pwl", "3": "bn3"}
            )  # fmt: skip
            timm_key = f"{_timm_block(n - 1, TIMM_STAGES['mobilenet_v2'])}.{names[where]}.{rest}"
        else:
            top = {"features.0.0.": "conv_stem.", "features.0.1.": "bn1.",
                   "features.18.0.": "conv_head.", "features.18.1.": "bn2.",
                   "classifier.1.": "classifier."}  # fmt: skip
            prefix = next(p for p in top if key.startswith(p))
            timm_key = top[prefix] + key.removeprefix(prefix)
        timm_state[timm_key] = value
    assert "blocks.6.0.conv_pwl.weight" in timm_state and "blocks.3.3.bn3.bias" in timm_state
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(timm_state, path)
    net = build_network(spec.layers, 1000, 3, 32)
    load_pretrained(net, plan_weights(str(path), spec), progress=False)
    for key, value in net.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


# ------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_torchvision_layout_file_loads(tmp_path: Path, suffix: str) -> None:
    state = _published_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    spec = load_model_spec("resnet18")  # a FILE takes the preset's imagenet preprocessing
    plan = plan_weights(str(path), spec)
    assert plan.kind == "file" and plan.preprocessing.std == tuple(STD)
    net = build_network(_spec_layers(), 10, 3, 16)
    loaded = load_pretrained(net, plan, progress=False)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_loaded(net, state, head=True)


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_payload_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    plan = plan_weights(str(path), load_model_spec("resnet18"))
    with pytest.raises(WeightsError, match=r"refused: not a weights-only PyTorch file"):
        load_pretrained(build_network(_spec_layers(), 3, 3, 16), plan)
    assert not marker.exists()


def test_a_file_of_another_layout_names_missing_unexpected_and_misshaped_keys(tmp_path) -> None:
    state = _published_state()
    del state["layer1.0.conv2.weight"]
    state["layer9.weight"] = torch.zeros(2)
    state["bn1.weight"] = torch.ones(5)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    plan = plan_weights(str(path), load_model_spec("resnet18"))
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_network(_spec_layers(), 10, 3, 16), plan)
    assert str(info.value) == (
        f"{path} does not fit resnet18: missing 1 (layer1.0.conv2.weight); unexpected 1 "
        "(layer9.weight); bn1.weight is (5,) in the file, (4,) in the network"
    )


def test_weights_that_are_nothing_known_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        plan_weights(str(tmp_path / "missing.pth"), load_model_spec("fast"))
    assert str(info.value) == (
        f"train.weights {tmp_path / 'missing.pth'}: not a file, URL or run directory, nor "
        "weights "
        "published for fast (none published)"
    )
    with pytest.raises(WeightsError, match="not a cnnkit run directory"):
        plan_weights(str(tmp_path), load_model_spec("fast"))


# ------------------------------------------------------------------------- run directories


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory of the ``fast`` network (saved, not trained: the weights are random)."""
    from cnnkit.model_io import ModelMeta, save_model

    torch.manual_seed(3)
    net = build_network(load_model_spec("fast").layers, 3, 3, 32)
    meta = ModelMeta(
        classes=("circle", "square", "triangle"),
        preprocessing=Preprocessing(
            size=32,
            channels=3,
            mean=(0.5, 0.4, 0.3),
            std=(0.2, 0.25, 0.3),
            resize="pad",
        ),
        architecture=tuple(net.architecture()),
        model_name="fast",
    )
    save_model(tmp_path / "run", net, meta)
    return tmp_path / "run"


def test_a_run_directory_keeps_its_head_for_the_same_classes_only(run_dir: Path) -> None:
    from safetensors.torch import load_file

    spec = load_model_spec("fast")
    plan = plan_weights(str(run_dir), spec)
    assert plan.kind == "run" and plan.classes == ("circle", "square", "triangle")
    assert plan.preprocessing == Preprocessing(32, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "pad")
    saved = load_file(str(run_dir / "model.safetensors"))
    same = build_network(spec.layers, 3, 3, 32)
    assert load_pretrained(same, plan, ("circle", "square", "triangle")).new_head is None
    assert all(torch.equal(same.state_dict()[k], v) for k, v in saved.items())
    other = build_network(spec.layers, 3, 3, 32)
    head = other.layers["dense1"].weight.detach().clone()
    loaded = load_pretrained(other, plan, ("a", "b", "c"))
    assert loaded.new_head == "3 classes there, 3 other ones here"
    assert torch.equal(other.layers["dense1"].weight, head)  # untouched: a new layer
    assert torch.equal(other.state_dict()["layers.conv1.weight"], saved["layers.conv1.weight"])
    wrong = build_network(load_model_spec("seed").layers, 3, 3, 32)
    with pytest.raises(WeightsError, match=r"\(a fast run\) does not fit seed: missing"):
        load_pretrained(wrong, plan_weights(str(run_dir), load_model_spec("seed")))


# ------------------------------------------------------------------------- in a run


def test_a_run_starts_from_weights_records_them_and_feeds_as_they_expect(
    run_dir: Path, tiny_shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    import cnnkit

    data = tmp_path / "two"
    for name in ("circle", "square"):
        shutil.copytree(tiny_shapes / name, data / name)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="cnnkit"):
        cnnkit.train(data, out, weights=str(run_dir), epochs=1, batch_size=4, augment=False)
    assert "the classification layer (dense1) is new: 3 classes there, 2 other ones here" in (
        caplog.text
    )
    sha = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["weights"] == str(run_dir)
    assert config["train"]["weights_sha256"] == sha
    assert config["data"]["image_size"] == 32  # the weights' input size (fast's own is 64)
    meta = json.loads((out / "model.json").read_text())
    assert meta["weights"] == {"source": str(run_dir), "sha256": sha}
    pre = meta["preprocessing"]
    assert pre["mean"] == [0.5, 0.4, 0.3] and pre["std"] == [0.2, 0.25, 0.3]  # the weights'
    assert pre["size"] == 32 and meta["classes"] == ["circle", "square"]
    # Resumed for one more epoch: the checkpoint's weights, still fed as the weights expect.
    from cnnkit.config import RunConfig
    from cnnkit.training.loop import train

    config["train"]["epochs"] = 2
    train(RunConfig.from_dict(config), out, resume=True, progress=False)
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 3  # header + 2
    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocessing"]["mean"] == [0.5, 0.4, 0.3] and meta["weights"]["sha256"] == sha


def test_the_cli_takes_weights_and_says_what_is_wrong_in_one_line(tiny_shapes, tmp_path) -> None:
    from typer.testing import CliRunner

    from cnnkit.cli import app

    result = CliRunner().invoke(
        app,
        [
            *("train", str(tiny_shapes), "--out", str(tmp_path / "o")),
            *("--weights", "nope.pth", "--model", "fast"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: --weights nope.pth: not a file, URL or run directory, nor weights published "
        "for fast (none published)"
    )


@pytest.mark.parametrize(
    ("weights", "chosen", "refusal"),
    [
        ("imagenet", "efficientnet_lite0", None),
        ("RUN", "fast", None),
        ("nope.pth", None, "train.weights nope.pth: not a file, URL, run directory or 'imagenet'"),
        ("FILE", None, "say which network the weights are for with model (e.g. "),
        ("http://127.0.0.1:9/w.pth", None, "say which network the weights are for with model"),
    ],
)
def test_model_auto_with_weights_is_the_network_they_are_for(
    run_dir: Path, tiny_shapes: Path, tmp_path: Path, weights: str, chosen, refusal
) -> None:
    from cnnkit.config import Overrides
    from cnnkit.training.plan import settings

    source = {"RUN": str(run_dir), "FILE": str(run_dir / "model.safetensors")}.get(weights, weights)
    overrides = Overrides.of(path=tiny_shapes, weights=source)
    if refusal is None:
        assert settings(None, overrides).model == chosen
    else:
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            settings(None, overrides)


def test_a_url_is_downloaded_once_and_its_layout_recognised(published, server) -> None:
    _, state, name = published
    url = f"{server.url}/models/{name}"
    plan = plan_weights(url, load_model_spec("resnet18"))
    assert (plan.kind, plan.layout, plan.preprocessing.size) == ("url", "auto", 224)
    net = build_network(_spec_layers(), 10, 3, 16)
    load_pretrained(net, plan, progress=False)
    load_pretrained(build_network(_spec_layers(), 10, 3, 16), plan, progress=False)
    assert server.requests == [(f"/models/{name}", None)]
    _assert_loaded(net, state, head=True)


def test_the_weights_decide_the_input_unless_the_config_does(run_dir: Path) -> None:
    from cnnkit.config import DataConfig, RunConfig
    from cnnkit.models.weights import fit_config

    plan = plan_weights(str(run_dir), load_model_spec("fast"))
    fitted = fit_config(RunConfig(data=DataConfig(path="x")), plan)
    assert (fitted.data.image_size, fitted.data.channels) == (32, 3)
    given = fit_config(RunConfig(data=DataConfig(path="x", image_size=48, channels=1)), plan)
    assert (given.data.image_size, given.data.channels) == (48, 1)
    assert fit_config(given, None) is given


def test_a_recorded_sha256_refuses_another_file(run_dir: Path) -> None:
    plan = plan_weights(str(run_dir), load_model_spec("fast"))
    net = build_network(load_model_spec("fast").layers, 3, 3, 32)
    with pytest.raises(WeightsError, match=r"sha256 [0-9a-f]{16}\.\.\., the config expects 0000"):
        load_pretrained(net, plan, expect_sha256="0" * 64)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weights", "", "train.weights: expected imagenet, a file, a URL or a run directory"),
        ("weights_sha256", "abc", "train.weights_sha256: expected 64 hex digits, got 'abc'"),
    ],
)
def test_weights_settings_are_checked(field: str, value: str, message: str) -> None:
    from cnnkit.config import TrainConfig
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}"):
        TrainConfig(**{field: value})
