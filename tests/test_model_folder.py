"""The project's model folder (`save_model`/`load_model`/`describe_model`) and the `magiclens_core.convert` CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official_format import FIXTURE_PKL, write_official

from magiclens_core.errors import CheckpointError
from magiclens_core.factory import ModelInfo, describe_model, load_model
from magiclens_core.model.config import MagicLensConfig
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.weights.digest import file_sha256
from magiclens_core.weights.folder import CONFIG_FILE, WEIGHTS_FILE, read_config_json, save_model
from magiclens_core.weights.official import load_official_checkpoint, read_official_arrays

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The tiny checkpoint saved once as a model folder (copy it before damaging it)."""
    return save_model(load_official_checkpoint(FIXTURE_PKL), tmp_path_factory.mktemp("saved") / "tiny",
                      metadata={"note": "tiny fixture"})


@pytest.fixture
def damaged(tmp_path, saved) -> Path:
    """A private copy of the saved folder, free to break."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def edit_config(folder: Path, edit) -> None:
    path = folder / CONFIG_FILE
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def embed(model, official_inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.embed(*official_inputs)


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_identical(saved, official_inputs, official_reference_embed):
    model = load_model(saved)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(embed(model, official_inputs), official_reference_embed)
    official = load_official_checkpoint(FIXTURE_PKL).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == official.keys()
    assert all(torch.equal(loaded[k], official[k]) for k in official)


def test_round_trip_keeps_the_model_id(tmp_path):
    model = load_official_checkpoint(FIXTURE_PKL)
    saved_id = read_config_json(save_model(model, tmp_path / "m"))["model_id"]
    assert saved_id.startswith(f"magiclens-{model.config.name}-")
    loaded = load_model(tmp_path / "m")
    assert loaded.model_id == saved_id
    # saving the loaded model again names the same weights the same way
    assert read_config_json(save_model(loaded, tmp_path / "again"))["model_id"] == saved_id


def test_saved_files_are_readable_by_the_group_and_others(tmp_path):
    folder = save_model(load_official_checkpoint(FIXTURE_PKL), tmp_path / "m")
    for path in (folder / CONFIG_FILE, folder / WEIGHTS_FILE):
        assert path.stat().st_mode & 0o044 == 0o044, oct(path.stat().st_mode)  # written through owner-only temps
    assert not list(folder.glob(".*"))  # no temporary file left beside them


def test_model_id_depends_on_the_weights_only(tmp_path):
    first = save_model(load_official_checkpoint(FIXTURE_PKL), tmp_path / "a", metadata={"run": 1})
    second = save_model(load_official_checkpoint(FIXTURE_PKL), tmp_path / "b", metadata={"run": 2})
    assert read_config_json(first)["model_id"] == read_config_json(second)["model_id"]


def test_model_id_changes_when_weights_change(tmp_path, saved):
    model = load_model(saved)
    with torch.no_grad():
        model.head.pooler.query.add_(1e-3)
    save_model(model, tmp_path / "changed")
    changed, original = read_config_json(tmp_path / "changed"), read_config_json(saved)
    assert changed["model_id"] != original["model_id"]
    assert changed["weights_sha256"] != original["weights_sha256"]
    assert load_model(tmp_path / "changed").model_id == changed["model_id"]


def test_config_json_describes_the_model(saved):
    model = load_official_checkpoint(FIXTURE_PKL)
    document = json.loads((saved / CONFIG_FILE).read_text())
    assert document["format"] == "magiclens-torch"
    assert document["format_version"] == 1
    assert document["config"] == model.config.to_dict()
    assert MagicLensConfig.from_dict(document["config"]) == model.config
    assert document["config"]["head"]["num_layers"] == 2
    assert document["weights_sha256"] == file_sha256(saved / WEIGHTS_FILE)
    assert document["model_id"].endswith(document["weights_sha256"][:12])
    assert document["metadata"] == {"note": "tiny fixture"}


def test_folder_holds_only_the_two_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_saving_over_an_existing_folder(tmp_path, saved, official_inputs, official_reference_embed):
    target = Path(shutil.copytree(saved, tmp_path / "again"))
    save_model(load_model(saved), target)
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert torch.equal(embed(load_model(target), official_inputs), official_reference_embed)


def test_load_model_accepts_the_official_pkl(official_inputs, official_reference_embed):
    model = load_model(FIXTURE_PKL)
    assert model.model_id.startswith("magiclens-official-")
    assert torch.equal(embed(model, official_inputs), official_reference_embed)


# --------------------------------------------------------------------------- describe_model


@pytest.mark.parametrize("which", ["folder", "official"])
def test_describe_model_agrees_with_the_loaded_model(saved, which):
    path = saved if which == "folder" else FIXTURE_PKL
    info, model = describe_model(path), load_model(path)
    assert info == ModelInfo(model.model_id, model.config, which)
    assert (info.dim, info.image_size, info.clip_dim) == (model.embed_dim, model.image_size, 64)


@pytest.mark.parametrize("which", ["folder", "official"])
def test_describe_model_does_not_build_the_network(saved, which, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("describe_model built a MagicLens")

    monkeypatch.setattr(MagicLens, "__init__", refuse)
    assert describe_model(saved if which == "folder" else FIXTURE_PKL).format == which


def test_describe_model_reads_config_json_only(damaged):
    """The weights are checked when the model loads (on the workers), not when it is described."""
    (damaged / WEIGHTS_FILE).write_bytes(b"")
    assert describe_model(damaged).model_id == read_config_json(damaged)["model_id"]
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(damaged)


# --------------------------------------------------------------------------- refused folders

# what `describe_model` reads (config.json, the path) it refuses as `load_model` does
READERS = pytest.mark.parametrize("read", [load_model, describe_model], ids=["load", "describe"])


@pytest.mark.parametrize("keep", [0, 4, 100, "half", "all but one"])
def test_truncated_weights(damaged, keep):
    weights = damaged / WEIGHTS_FILE
    data = weights.read_bytes()
    cut = {"half": len(data) // 2, "all but one": len(data) - 1}.get(keep, keep)
    weights.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_model(damaged)
    assert WEIGHTS_FILE in str(info.value)


@READERS
@pytest.mark.parametrize("text", ["{not json", "", '{"format": "magiclens-torch",', "\udcff"])
def test_corrupt_config_json(read, damaged, text):
    (damaged / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        read(damaged)
    assert CONFIG_FILE in str(info.value)


@READERS
@pytest.mark.parametrize("document", [[], "magiclens", {"format": "something-else"}])
def test_config_json_of_another_format(read, damaged, document):
    (damaged / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="is not a magiclens-torch config"):
        read(damaged)


@READERS
@pytest.mark.parametrize("version", [2, "1", None])
def test_unreadable_format_version(read, damaged, version):
    edit_config(damaged, lambda d: d.update(format_version=version))
    with pytest.raises(CheckpointError, match="format version"):
        read(damaged)


@READERS
def test_config_json_without_model_id(read, damaged):
    edit_config(damaged, lambda d: d.pop("model_id"))
    with pytest.raises(CheckpointError, match="no model_id"):
        read(damaged)


def test_weights_replaced_after_saving(damaged, tmp_path):
    """Other weights of the same shapes under the old config.json would carry a false model_id."""
    other = load_official_checkpoint(FIXTURE_PKL)
    with torch.no_grad():
        other.head.pooler.query.add_(0.5)
    save_model(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_FILE, damaged / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="was replaced after saving"):
        load_model(damaged)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("head", "num_layers", 1), ("head", "num_layers", 3), ("clip", "vision_width", 64), ("head", "ff_dim", 128)],
)
def test_config_that_does_not_match_the_weights(damaged, section, field, value):
    edit_config(damaged, lambda d: d["config"][section].update({field: value}))
    with pytest.raises(CheckpointError, match="does not match its config") as info:
        load_model(damaged)
    assert WEIGHTS_FILE in str(info.value)


@READERS
@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["head"].update(num_heads=0),
        lambda c: c["clip"].update(vision_heads=3),
        lambda c: c["clip"].update(vision_patch_size="32"),
        lambda c: c["clip"].update(unknown_field=1),
        lambda c: c.update(extra={}),
        lambda c: c.update(head=None),
    ],
    ids=["zero-heads", "indivisible-heads", "string-patch", "unknown-clip-field", "unknown-key", "null-head"],
)
def test_invalid_config(read, damaged, edit):
    edit_config(damaged, lambda d: edit(d["config"]))
    with pytest.raises(CheckpointError, match="invalid model config") as info:
        read(damaged)
    assert CONFIG_FILE in str(info.value)


@READERS
@pytest.mark.parametrize("config", [None, "base", 5])
def test_config_that_is_not_a_dict(read, damaged, config):
    edit_config(damaged, lambda d: d.update(config=config))
    with pytest.raises(CheckpointError, match="invalid model config"):
        read(damaged)


def test_missing_weights(damaged):
    (damaged / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_FILE}"):
        load_model(damaged)


@READERS
def test_folder_without_config_json(read, damaged):
    (damaged / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"is not a model folder: no {CONFIG_FILE}"):
        read(damaged)


@READERS
def test_empty_folder(read, tmp_path):
    with pytest.raises(CheckpointError, match="is not a model folder"):
        read(tmp_path)


@READERS
def test_non_existent_path(read, tmp_path):
    path = tmp_path / "nothing-here"
    with pytest.raises(CheckpointError, match="model not found") as info:
        read(path)
    assert str(path) in str(info.value)


@READERS
def test_non_existent_pkl(read, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read(tmp_path / "nothing-here.pkl")


@READERS
@pytest.mark.parametrize("name", ["model.bin", WEIGHTS_FILE, CONFIG_FILE])
def test_file_that_is_neither_folder_nor_pkl(read, tmp_path, saved, name):
    path = tmp_path / name
    path.write_bytes((saved / WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="expected a model folder"):
        read(path)


# --------------------------------------------------------------------------- the convert CLI


def convert(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magiclens_core.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_cli_converts_the_official_checkpoint(tmp_path, official_inputs, official_reference_embed):
    out_dir = tmp_path / "converted"
    result = convert(FIXTURE_PKL, out_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["out_dir"] == str(out_dir)
    assert report["embed_dim"] == 64
    model = load_model(out_dir)
    assert model.model_id == report["model_id"] == read_config_json(out_dir)["model_id"]
    assert torch.equal(embed(model, official_inputs), official_reference_embed)
    assert read_config_json(out_dir)["metadata"]["converted_from"] == FIXTURE_PKL.name
    # the same weights, the same id: a table embedded with the .pkl accepts the converted folder
    assert model.model_id == load_official_checkpoint(FIXTURE_PKL).model_id


def cli_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return result.stderr


def test_cli_refuses_a_corrupt_checkpoint(tmp_path):
    data = FIXTURE_PKL.read_bytes()
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(data[: len(data) // 2])
    stderr = cli_error(convert(corrupt, tmp_path / "out"))
    assert str(corrupt) in stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_inconsistent_checkpoint(tmp_path):
    arrays = read_official_arrays(FIXTURE_PKL)
    arrays["clip/visual/class_embedding"] = np.zeros(127, np.float32)  # not divisible by the 2 heads
    cli_error(convert(write_official(tmp_path / "odd.pkl", arrays), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    stderr = cli_error(convert(tmp_path / "missing.pkl", tmp_path / "out"))
    assert "checkpoint not found" in stderr
