"""Architecture configuration of MagicLens: CLIP towers plus the fusion head, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _check_sizes(config: ClipConfig | HeadConfig) -> None:
    """Every size of a tower or head config is a positive integer (a positive number for ratios)."""
    for item in fields(config):
        value = getattr(config, item.name)
        number = (int, float) if item.type == "float" else int
        if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
            kind = "a positive number" if item.type == "float" else "a positive integer"
            raise ValueError(f"{type(config).__name__}.{item.name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP backbone (open_clip layout, QuickGELU activations)."""

    embed_dim: int = 512
    image_size: int = 224
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_patch_size: int = 16
    vision_mlp_ratio: float = 4.0
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        _check_sizes(self)

    @property
    def open_clip_name(self) -> str | None:
        """The open_clip model name this backbone corresponds to, if it is a released one."""
        for name, size in OPEN_CLIP_NAMES.items():
            if NAMED_CONFIGS[size].clip == self:
                return name
        return None


@dataclass(frozen=True)
class HeadConfig:
    """The fusion encoder over [image, text] tokens and the attention pooler."""

    embed_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    ff_dim: int = 2048
    num_query_tokens: int = 1
    pooler_width: int = 2048  # the pooler's attention width (4·D in the released models)

    def __post_init__(self) -> None:
        _check_sizes(self)


@dataclass(frozen=True)
class MagicLensConfig:
    """A whole MagicLens model; `name` is informative (`base`, `large`, `tiny`, or a custom label)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.clip.embed_dim != self.head.embed_dim:
            raise ValueError(
                f"CLIP embed_dim {self.clip.embed_dim} != head embed_dim {self.head.embed_dim}"
            )
        for what, width, heads in (
            ("vision", self.clip.vision_width, self.clip.vision_heads),
            ("text", self.clip.text_width, self.clip.text_heads),
            ("fusion", self.head.embed_dim, self.head.num_heads),
            ("pooler", self.head.pooler_width, self.head.num_heads),
        ):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by {heads} heads")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, the inverse of `from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MagicLensConfig:
        """Build from `to_dict` output; unknown keys are an error, not silently dropped."""
        known = {"clip", "head", "name"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MagicLens config keys: {sorted(unknown)}")
        return cls(
            clip=ClipConfig(**data.get("clip", {})),
            head=HeadConfig(**data.get("head", {})),
            name=data.get("name", "custom"),
        )


NAMED_CONFIGS: dict[str, MagicLensConfig] = {
    "base": MagicLensConfig(
        clip=ClipConfig(),
        head=HeadConfig(embed_dim=512, num_heads=8, ff_dim=2048, pooler_width=2048),
        name="base",
    ),
    "large": MagicLensConfig(
        clip=ClipConfig(
            embed_dim=768,
            vision_width=1024,
            vision_layers=24,
            vision_heads=16,
            vision_patch_size=14,
            text_width=768,
            text_layers=12,
            text_heads=12,
        ),
        head=HeadConfig(embed_dim=768, num_heads=16, ff_dim=3072, pooler_width=3072),
        name="large",
    ),
    # a small random model for tests, demos and learning checks: 64-pixel images, 16-pixel patches
    "tiny": MagicLensConfig(
        clip=ClipConfig(embed_dim=64, image_size=64, vision_width=64, vision_layers=2, vision_heads=4,
                        vision_patch_size=16, text_width=64, text_layers=2, text_heads=4),
        head=HeadConfig(embed_dim=64, num_layers=2, num_heads=4, ff_dim=256, pooler_width=256),
        name="tiny",
    ),
}

# open_clip model names of the released backbones (QuickGELU variants, as in the official code).
OPEN_CLIP_NAMES: dict[str, str] = {"ViT-B-16-quickgelu": "base", "ViT-L-14-quickgelu": "large"}


def resolve_config(spec: str | dict[str, Any] | MagicLensConfig) -> MagicLensConfig:
    """A config from a size name (`base`/`large`/`tiny`), a dict, or a config."""
    if isinstance(spec, MagicLensConfig):
        return spec
    if isinstance(spec, dict):
        return MagicLensConfig.from_dict(spec)
    if spec in NAMED_CONFIGS:
        return NAMED_CONFIGS[spec]
    raise ValueError(f"unknown model size {spec!r}; expected one of {sorted(NAMED_CONFIGS)} or a config")
