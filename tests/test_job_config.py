"""Job configuration: dataclass fields as flags, a YAML/JSON file underneath, flags on top."""

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from jobs.common import parse_config


@dataclass
class Options:
    images: str
    batch_size: int = 32
    precision: Literal["fp32", "bf16"] = "fp32"
    clip_vector: bool = False
    gpus: float | None = None
    columns: list[str] = field(default_factory=list)


def test_flags_build_the_config():
    config = parse_config(Options, ["--images", "/data", "--batch-size", "8", "--clip-vector", "true",
                                    "--gpus", "0.5", "--columns", "a", "b"])
    assert config == Options(images="/data", batch_size=8, clip_vector=True, gpus=0.5, columns=["a", "b"])


def test_file_underneath_flags_on_top(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("images: /from-file\nbatch-size: 4\nprecision: bf16\n")
    config = parse_config(Options, ["--config", str(path), "--batch-size", "16"])
    assert (config.images, config.batch_size, config.precision) == ("/from-file", 16, "bf16")
    json_path = tmp_path / "job.json"
    json_path.write_text(json.dumps({"images": "/j", "clip_vector": True}))
    assert parse_config(Options, ["--config", str(json_path)]).clip_vector is True


@pytest.mark.parametrize("argv", [
    [],                                              # required option missing
    ["--images", "x", "--precision", "fp64"],       # not a choice
    ["--images", "x", "--batch-size", "many"],      # not an int
    ["--images", "x", "--clip-vector", "maybe"],    # not a bool
])
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Options, argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_key_in_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("images: x\nbatchsize: 4\n")
    with pytest.raises(SystemExit):
        parse_config(Options, ["--config", str(path)])
    assert "batchsize" in capsys.readouterr().err
