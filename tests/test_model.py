"""Model construction: named sizes, custom configs, open_clip equivalence and backbone initialisation."""

import os
import subprocess
import sys
from dataclasses import replace

import open_clip
import pytest
import torch

from magiclens_core import MagicLens, MagicLensConfig, create_model
from magiclens_core.model.config import NAMED_CONFIGS, ClipConfig, HeadConfig

TINY = NAMED_CONFIGS["tiny"]


@pytest.mark.parametrize("size,count", [("base", 166_433_025), ("large", 465_417_665)])
def test_named_sizes_have_the_papers_parameter_counts(size, count):
    with torch.device("meta"):
        model = MagicLens(size)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("size,name", [("base", "ViT-B-16-quickgelu"), ("large", "ViT-L-14-quickgelu")])
def test_towers_are_open_clips_quickgelu_models(size, name):
    with torch.device("meta"):
        ours = MagicLens(size).clip
        reference = open_clip.create_model(name, device="meta")
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert NAMED_CONFIGS[size].clip.open_clip_name == name


def test_config_round_trips_and_embeds():
    custom = replace(TINY, head=replace(TINY.head, num_layers=1), name="custom")
    assert MagicLensConfig.from_dict(custom.to_dict()) == custom
    model = MagicLens(custom.to_dict()).eval()
    assert len(model.head.layers) == 1
    pixels = torch.rand(2, 3, 50, 70)
    with torch.no_grad():
        out = model.embed(pixels, model.tokenize(["make it blue", ""]))
    assert out.shape == (2, TINY.head.embed_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_tiny_is_a_named_size():
    model = create_model("tiny")
    assert model.config is TINY and model.config.name == "tiny"
    assert (model.embed_dim, model.image_size) == (64, 64)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown MagicLens config keys"):
        MagicLensConfig.from_dict({**TINY.to_dict(), "heads": 3})
    with pytest.raises(ValueError, match="embed_dim"):
        MagicLensConfig(clip=TINY.clip, head=HeadConfig(embed_dim=48, num_heads=2, ff_dim=64, pooler_width=96))
    with pytest.raises(ValueError, match="vision_patch_size must be a positive integer"):
        ClipConfig(vision_patch_size="16")
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        HeadConfig(num_heads=0)
    with pytest.raises(ValueError, match="vision_mlp_ratio must be a positive number"):
        ClipConfig(vision_mlp_ratio=True)
    with pytest.raises(ValueError, match="unknown model size"):
        MagicLens("huge")


def test_backbone_from_a_local_open_clip_checkpoint(tmp_path):
    donor = MagicLens(TINY)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(donor.clip.state_dict(), path)
    model = create_model(TINY, backbone=path)
    for key, value in donor.clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        create_model(TINY, backbone=tmp_path / "missing.bin")


def test_pretrained_tag_needs_a_released_size():
    with pytest.raises(ValueError, match="released backbone size"):
        create_model(TINY, backbone="openai")


def test_unknown_pretrained_tag_lists_known_ones():
    with pytest.raises(ValueError, match="known tags"):
        create_model("base", backbone="no-such-tag")


def test_offline_pretrained_tag_says_which_file_to_provide():
    """Offline, fetching a tag fails with an error naming the file, not a hub traceback."""
    code = (
        "from magiclens_core import create_model, BackboneWeightsUnavailable\n"
        "try:\n    create_model('base', backbone='openai')\n"
        "except BackboneWeightsUnavailable as err:\n    print('MESSAGE', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "MESSAGE" in result.stdout, result.stderr[-2000:]
    assert "timm/vit_base_patch16_clip_224.openai" in result.stdout
    assert "open_clip_pytorch_model.bin" in result.stdout
    assert "offline" in result.stdout
