"""One description of preprocessing: ``Preprocessing`` says how a model is fed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import ConfigError

# No field at its default and no two alike, so a field lost or swapped on the way shows.
UNUSUAL = Preprocessing(size=24, channels=1, mean=(0.3,), std=(0.7,), resize="pad")


def test_the_json_object_holds_every_field_and_reads_back_equal() -> None:
    names = {field.name for field in dataclasses.fields(Preprocessing)}
    assert set(UNUSUAL.to_dict()) == names
    assert Preprocessing.from_dict(json.loads(json.dumps(UNUSUAL.to_dict()))) == UNUSUAL
    assert UNUSUAL.shape == (24, 24, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 2}, "size: expected 4 to 1024 pixels, got 2"),
        ({"channels": 2}, "channels: expected 1 or 3, got 2"),
        ({"resize": "zoom"}, "resize: expected one of crop, squash, pad, got 'zoom'"),
        ({"mean": (0.3, 0.3)}, "normalisation mean has 2 values for 1 channels"),
        ({"std": (0.0,)}, "normalisation std[0] is 0.0: every input would be divided"),
    ],
)
def test_a_description_cnnkit_never_writes_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(UNUSUAL, **change)
    assert str(info.value).startswith(message)
