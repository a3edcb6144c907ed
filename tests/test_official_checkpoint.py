"""The official `.pkl` reader: format round trip, architecture inference, and refusal of bad files."""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import torch
from official_format import FIXTURE_DIR, FIXTURE_PKL, official_bytes, write_official

from magiclens_core.errors import CheckpointError
from magiclens_core.model.config import NAMED_CONFIGS
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.weights.digest import file_sha256
from magiclens_core.weights.official import (
    _official_shapes,
    infer_config,
    load_official_checkpoint,
    map_official_arrays,
    official_model_id,
    read_official_arrays,
    read_official_config,
)

FFN2_BIAS = "multimodal_encoder/x_layers_0/ff_layer/ffn_layer2/bias/b"
# the full load and the shapes-only read (what `describe_model` uses) refuse the same files
READERS = pytest.mark.parametrize("read", [load_official_checkpoint, read_official_config], ids=["load", "shapes"])


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    """The fixture's official arrays (copy the dict before editing it)."""
    return read_official_arrays(FIXTURE_PKL)


def without(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    dropped = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
    assert len(dropped) < len(arrays), f"no key starts with {prefix!r}"
    return dropped


def replaced(arrays: dict[str, np.ndarray], key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    assert key in arrays
    return {**arrays, key: value}


# --------------------------------------------------------------------------- the writer and the format


def test_writer_reproduces_fixture_bytes(arrays):
    assert official_bytes(arrays) == FIXTURE_PKL.read_bytes()


def test_written_checkpoint_round_trips(tmp_path, arrays, official_inputs, official_reference_embed):
    path = write_official(tmp_path / "copy.pkl", arrays)
    again = read_official_arrays(path)
    assert list(again) == list(arrays)
    for key, value in arrays.items():
        assert again[key].dtype == value.dtype and again[key].shape == value.shape, key
        assert np.array_equal(again[key], value), key
    assert again["clip/logit_scale"].shape == ()
    model = load_official_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(model.embed(*official_inputs), official_reference_embed)


def test_shapes_only_read_has_every_shape_and_dtype_but_no_values(arrays):
    shapes = read_official_arrays(FIXTURE_PKL, shapes_only=True)
    assert list(shapes) == list(arrays)
    assert all(shapes[k].shape == v.shape and shapes[k].dtype == v.dtype for k, v in arrays.items())
    assert all(not value.flags.writeable and not value.any() for value in shapes.values())
    assert read_official_config(FIXTURE_PKL) == infer_config(arrays)


def test_model_id_is_derived_from_the_file_sha256():
    expected = f"magiclens-official-{file_sha256(FIXTURE_PKL)[:12]}"
    assert official_model_id(FIXTURE_PKL) == load_official_checkpoint(FIXTURE_PKL).model_id == expected


def test_float16_checkpoint_loads_as_float32(tmp_path, arrays, official_inputs, official_reference_embed):
    half = {k: v.astype(np.float16) for k, v in arrays.items()}
    model = load_official_checkpoint(write_official(tmp_path / "half.pkl", half))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        np.testing.assert_allclose(model.embed(*official_inputs).numpy(), official_reference_embed.numpy(), atol=2e-2)


# --------------------------------------------------------------------------- architecture inference


def test_fixture_config_matches_manifest(arrays):
    manifest = json.loads((FIXTURE_DIR / "manifest.json").read_text())["config"]
    official_clip, official_head = manifest["clip"], manifest["magiclens"]
    config = infer_config(arrays)
    clip, head = config.clip, config.head
    assert clip.embed_dim == official_clip["embed_dim"] == 64
    assert clip.vocab_size == official_clip["vocab_size"]
    assert clip.vision_layers == official_clip["vision_num_layers"] == 2
    assert clip.vision_width == official_clip["vision_features"] == 128
    assert clip.vision_patch_size == official_clip["vision_patch_size"] == 32
    assert clip.vision_heads == official_clip["vision_heads"] == 2
    assert clip.image_size == official_clip["image_resolution"] == 224
    assert clip.text_width == official_clip["text_features"] == 64
    assert clip.text_heads == official_clip["text_num_heads"] == 2
    assert clip.text_layers == official_clip["text_num_layers"] == 2
    assert clip.context_length == official_clip["context_length"] == 77
    assert clip.vision_mlp_ratio == clip.text_mlp_ratio == 4.0
    assert head.embed_dim == official_head["embed_dim"] == 64
    assert head.ff_dim == official_head["ff_hidden_size"] == 256
    assert head.num_layers == official_head["num_layers"] == 2
    assert head.num_heads == official_head["num_heads"] == 2
    assert head.num_query_tokens == official_head["num_query_token"] == 1
    assert head.pooler_width == 4 * head.embed_dim == 256
    assert config.name == "custom"


@pytest.mark.parametrize(
    ("prefix", "section", "field"),
    [
        ("multimodal_encoder/x_layers_1/", "head", "num_layers"),
        ("clip/visual/transformer/resblocks_1/", "clip", "vision_layers"),
        ("clip/text/transformer/resblocks_1/", "clip", "text_layers"),
    ],
)
def test_dropping_the_last_layer_loads_a_shallower_model(tmp_path, arrays, official_inputs, prefix, section, field):
    model = load_official_checkpoint(write_official(tmp_path / "shallow.pkl", without(arrays, prefix)))
    assert getattr(getattr(model.config, section), field) == 1
    full = infer_config(arrays)
    assert getattr(getattr(full, section), field) == 2
    # nothing else about the architecture changes
    assert model.config == replace(full, **{section: replace(getattr(full, section), **{field: 1})})
    with torch.no_grad():
        embed = model.embed(*official_inputs)
    assert embed.shape == (2, 64) and torch.isfinite(embed).all()


def test_narrower_feed_forward_is_inferred(tmp_path, arrays, official_inputs):
    narrow = dict(arrays)
    for i in range(2):
        ff = f"multimodal_encoder/x_layers_{i}/ff_layer"
        narrow[f"{ff}/ffn_layer1/linear/w"] = arrays[f"{ff}/ffn_layer1/linear/w"][:, :96]
        narrow[f"{ff}/ffn_layer1/bias/b"] = arrays[f"{ff}/ffn_layer1/bias/b"][:96]
        narrow[f"{ff}/ffn_layer2/linear/w"] = arrays[f"{ff}/ffn_layer2/linear/w"][:96]
    model = load_official_checkpoint(write_official(tmp_path / "narrow.pkl", narrow))
    assert model.config.head.ff_dim == 96
    assert model.head.layers[0].ff_in.weight.shape == (96, 64)
    with torch.no_grad():
        assert torch.isfinite(model.embed(*official_inputs)).all()


@pytest.mark.parametrize("name", [*NAMED_CONFIGS, "fixture"])
def test_shape_table_and_inference_are_inverse(arrays, name):
    config = infer_config(arrays) if name == "fixture" else NAMED_CONFIGS[name]
    shapes = _official_shapes(config)
    # zero-copy placeholders: only the shapes matter to inference and mapping
    placeholders = {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
    mapped = {key: value.shape for key, value in map_official_arrays(placeholders, config).items()}
    with torch.device("meta"):
        model_shapes = {key: tuple(value.shape) for key, value in MagicLens(config).state_dict().items()}
    assert mapped == model_shapes
    inferred = infer_config(placeholders)
    assert inferred == config
    if name != "fixture":
        assert inferred is NAMED_CONFIGS[name]


def test_fixture_shapes_match_the_shape_table(arrays):
    shapes = _official_shapes(infer_config(arrays))
    assert set(shapes) == set(arrays)
    assert {k: v.shape for k, v in arrays.items()} == shapes


# --------------------------------------------------------------------------- refused arrays


@READERS
def test_missing_array_is_named(read, tmp_path, arrays):
    key = "contrastive_multimodal_pooler/pool_attn_ln/bias"
    path = write_official(tmp_path / "missing.pkl", without(arrays, key))
    with pytest.raises(CheckpointError, match="missing") as info:
        read(path)
    assert key in str(info.value)


@READERS
def test_missing_array_needed_for_inference_is_named(read, tmp_path, arrays):
    key = "clip/visual/conv1/kernel"
    path = write_official(tmp_path / "no_conv.pkl", without(arrays, key))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        read(path)


def test_first_layer_missing_is_refused(tmp_path, arrays):
    path = write_official(tmp_path / "no_layer0.pkl", without(arrays, "multimodal_encoder/x_layers_0/"))
    with pytest.raises(CheckpointError, match="x_layers_0"):
        load_official_checkpoint(path)


@READERS
def test_extra_array_is_named(read, tmp_path, arrays):
    key = "multimodal_encoder/bogus/w"
    path = write_official(tmp_path / "extra.pkl", {**arrays, key: np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected") as info:
        read(path)
    assert key in str(info.value)


@READERS
def test_gap_in_layer_numbers_is_refused(read, tmp_path, arrays):
    renamed = {k.replace("x_layers_1/", "x_layers_2/"): v for k, v in arrays.items()}
    with pytest.raises(CheckpointError) as info:
        read(write_official(tmp_path / "gap.pkl", renamed))
    assert "x_layers_1/" in str(info.value) and "x_layers_2/" in str(info.value)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        (FFN2_BIAS, (63,)),
        ("multimodal_encoder/x_layers_1/self_attention/post/w", (64, 2, 31)),
        ("clip/visual/transformer/resblocks_0/attn/key/kernel", (127, 2, 64)),
        ("clip/visual/transformer/resblocks_1/attn/key/kernel", (128, 2, 63)),
        ("clip/text/transformer/resblocks_1/mlp/c_proj/kernel", (256, 63)),
        ("clip/visual/positional_embedding", (40, 128)),
        ("clip/visual/ln_pre/scale", (128, 1)),
        ("clip/logit_scale", (2,)),
        ("contrastive_multimodal_pooler/pool_attn/per_dim_scale/per_dim_scale", (127,)),
        ("contrastive_multimodal_pooler/pool_attn_ln/bias", (65,)),
    ],
)
@READERS
def test_misshaped_array_is_named(read, tmp_path, arrays, key, shape):
    path = write_official(tmp_path / "misshaped.pkl", replaced(arrays, key, np.zeros(shape, np.float32)))
    with pytest.raises(CheckpointError) as info:
        read(path)
    assert key in str(info.value)
    assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("clip/visual/class_embedding", (128, 1)),  # wrong rank for an array the inference reads
        ("clip/visual/conv1/kernel", ()),
        ("multimodal_encoder/x_layers_0/self_attention/query/w", (64, 128)),
    ],
)
@READERS
def test_wrong_rank_of_an_inference_array_is_named(read, tmp_path, arrays, key, shape):
    path = write_official(tmp_path / "rank.pkl", replaced(arrays, key, np.zeros(shape, np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        read(path)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("clip/visual/class_embedding", (127,)),  # width not divisible by the heads
        ("clip/visual/transformer/resblocks_0/attn/query/kernel", (128, 0, 64)),  # zero heads
        ("contrastive_multimodal_pooler/pool_attn/query/w", (64, 4, 64)),  # pooler heads != fusion heads
    ],
)
@READERS
def test_inconsistent_architecture_is_a_checkpoint_error(read, tmp_path, arrays, key, shape):
    path = write_official(tmp_path / "inconsistent.pkl", replaced(arrays, key, np.zeros(shape, np.float32)))
    with pytest.raises(CheckpointError):
        read(path)


# --------------------------------------------------------------------------- refused files


@READERS
def test_truncated_file(read, tmp_path):
    data = FIXTURE_PKL.read_bytes()
    path = tmp_path / "half.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [1, 2, 7, -1])
def test_file_cut_anywhere(tmp_path, keep):
    data = FIXTURE_PKL.read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError):
        read_official_arrays(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pkl"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable official checkpoint"):
        load_official_checkpoint(path)


def test_truncated_msgpack_inside_a_whole_pickle(tmp_path):
    payload = pickle.loads(FIXTURE_PKL.read_bytes())
    path = tmp_path / "short_payload.pkl"
    path.write_bytes(pickle.dumps(payload[: len(payload) // 2]))
    with pytest.raises(CheckpointError, match="msgpack payload is corrupt or truncated"):
        load_official_checkpoint(path)


def test_pickle_of_a_dict_is_refused(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"params": {"a": [1.0, 2.0]}}))
    with pytest.raises(CheckpointError, match="expected a pickled bytes object, found dict"):
        load_official_checkpoint(path)


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@READERS
def test_malicious_pickle_is_refused_without_running_it(read, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    assert b"system" in path.read_bytes()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read(path)
    assert not marker.exists()


def test_pickle_needing_any_class_is_refused(tmp_path):
    path = tmp_path / "numpy.pkl"
    path.write_bytes(pickle.dumps(np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_official_checkpoint(path)


@pytest.mark.parametrize("payload", [b"this is not msgpack", b"\xc1", b"\x93\x01"])
def test_pickled_bytes_that_are_not_msgpack(tmp_path, payload):
    path = tmp_path / "notmsgpack.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="msgpack payload is corrupt or truncated"):
        load_official_checkpoint(path)


@pytest.mark.parametrize("tree", [[1, 2, 3], {"weights": {}}, "params"])
def test_msgpack_without_a_params_tree(tmp_path, tree):
    path = tmp_path / "noparams.pkl"
    path.write_bytes(pickle.dumps(msgpack.packb(tree)))
    with pytest.raises(CheckpointError, match="'params'"):
        load_official_checkpoint(path)


def test_non_array_leaf_is_named(tmp_path):
    path = tmp_path / "leaf.pkl"
    path.write_bytes(pickle.dumps(msgpack.packb({"params": {"clip": {"logit_scale": 4.6}}})))
    with pytest.raises(CheckpointError, match="clip/logit_scale"):
        read_official_arrays(path)


def test_unknown_extension_type_is_refused(tmp_path):
    path = tmp_path / "ext.pkl"
    path.write_bytes(pickle.dumps(msgpack.packb({"params": {"x": msgpack.ExtType(7, b"")}})))
    with pytest.raises(CheckpointError, match="extension type 7"):
        read_official_arrays(path)


@pytest.mark.parametrize("shapes_only", [False, True])
def test_array_record_with_wrong_byte_count_is_refused(tmp_path, shapes_only):
    record = msgpack.ExtType(1, msgpack.packb(([4, 4], "float32", b"\0" * 12)))
    path = tmp_path / "short_array.pkl"
    path.write_bytes(pickle.dumps(msgpack.packb({"params": {"x": record}})))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_official_arrays(path, shapes_only=shapes_only)


@READERS
def test_missing_file(read, tmp_path):
    path = tmp_path / "nowhere.pkl"
    with pytest.raises(CheckpointError, match="checkpoint not found") as info:
        read(path)
    assert str(path) in str(info.value)
