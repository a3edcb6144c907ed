"""Reading the released MagicLens checkpoints (`magic_lens_clip_{base,large}.pkl`) without JAX or flax.

A released file is one pickled `bytes` object holding flax's msgpack serialisation of `{'params': tree}`;
every array is a msgpack extension record (shape, dtype name, raw bytes). This module decodes that with
`msgpack` + numpy, infers the architecture from the array shapes, and maps every array onto `MagicLens`.
"""

from __future__ import annotations

import io
import pickle
import re
from functools import partial
from os import PathLike
from pathlib import Path

import msgpack
import numpy as np
import torch

from magiclens_core.errors import CheckpointError
from magiclens_core.model.config import NAMED_CONFIGS, ClipConfig, HeadConfig, MagicLensConfig
from magiclens_core.model.magiclens import MagicLens
from magiclens_core.weights.digest import file_sha256

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3


class _BytesOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a released checkpoint is a pickled `bytes`, never code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        raise CheckpointError(f"refusing to unpickle {module}.{name}: not an official checkpoint")


def _decode_ext(code: int, data: bytes, values: bool = True) -> np.ndarray:
    """One msgpack array record; without `values`, a zero-copy placeholder of its shape and dtype."""
    if code == _EXT_NDARRAY:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    elif code == _EXT_NPSCALAR:
        shape = ()
        dtype_name, buffer = msgpack.unpackb(data, raw=True)
    else:
        raise CheckpointError(f"unsupported msgpack extension type {code}")
    dtype = np.dtype(dtype_name.decode())
    if values:
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if len(buffer) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"an array record of shape {tuple(shape)} holds {len(buffer)} bytes")
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(shape))


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        elif isinstance(value, np.ndarray):
            flat[path] = value
        else:
            raise CheckpointError(f"unexpected {type(value).__name__} at {path!r}")
    return flat


def read_official_arrays(path: str | PathLike, shapes_only: bool = False) -> dict[str, np.ndarray]:
    """Every parameter array of an official checkpoint, keyed by its flax path (`clip/visual/...`).

    With `shapes_only`, each array is a read-only placeholder with the array's shape and dtype but no
    values (enough for `infer_config` and `check_arrays`, without copying any weights).
    """
    path = Path(path)
    try:
        payload = _BytesOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError:
        raise
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint not found: {path}") from err
    except Exception as err:  # pickle raises many types on damaged input
        raise CheckpointError(f"{path} is not a readable official checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(payload, (bytes, bytearray)):
        raise CheckpointError(f"{path}: expected a pickled bytes object, found {type(payload).__name__}")
    try:
        tree = msgpack.unpackb(payload, ext_hook=partial(_decode_ext, values=not shapes_only), raw=False,
                               strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: msgpack payload is corrupt or truncated: {err}") from err
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{path}: expected a {{'params': ...}} tree")
    return _flatten(tree["params"])


def _count(arrays: dict[str, np.ndarray], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in arrays if (m := regex.match(key))})


def _require(arrays: dict[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"official checkpoint is missing array {key!r}")
    if arrays[key].ndim != ndim:
        raise CheckpointError(f"official checkpoint array {key!r} has shape {arrays[key].shape}, "
                              f"expected {ndim} dimensions")
    return arrays[key]


def infer_config(arrays: dict[str, np.ndarray]) -> MagicLensConfig:
    """The architecture implied by the array shapes; names it `base`/`large` when it is one of those."""
    visual_q = _require(arrays, "clip/visual/transformer/resblocks_0/attn/query/kernel", 3)
    text_q = _require(arrays, "clip/text/transformer/resblocks_0/attn/query/kernel", 3)
    patch = _require(arrays, "clip/visual/conv1/kernel", 4).shape[0]
    grid = round(max(_require(arrays, "clip/visual/positional_embedding", 2).shape[0] - 1, 0) ** 0.5)
    vision_width = _require(arrays, "clip/visual/class_embedding", 1).shape[0]
    text_width = _require(arrays, "clip/text/token_embedding/embedding", 2).shape[1]
    clip = dict(
        embed_dim=_require(arrays, "clip/visual/proj/kernel", 2).shape[1],
        image_size=patch * grid,
        vision_width=vision_width,
        vision_layers=_count(arrays, r"clip/visual/transformer/resblocks_(\d+)/"),
        vision_heads=visual_q.shape[1],
        vision_patch_size=patch,
        vision_mlp_ratio=_require(arrays, "clip/visual/transformer/resblocks_0/mlp/c_fc/kernel", 2).shape[1]
        / vision_width,
        text_width=text_width,
        text_layers=_count(arrays, r"clip/text/transformer/resblocks_(\d+)/"),
        text_heads=text_q.shape[1],
        text_mlp_ratio=_require(arrays, "clip/text/transformer/resblocks_0/mlp/c_fc/kernel", 2).shape[1]
        / text_width,
        context_length=_require(arrays, "clip/text/positional_embedding", 2).shape[0],
        vocab_size=_require(arrays, "clip/text/token_embedding/embedding", 2).shape[0],
    )
    fusion_q = _require(arrays, "multimodal_encoder/x_layers_0/self_attention/query/w", 3)
    pool_q = _require(arrays, "contrastive_multimodal_pooler/pool_attn/query/w", 3)
    query_tokens = _require(arrays, "contrastive_multimodal_pooler/pooling_attn_query", 2)
    head = dict(
        embed_dim=query_tokens.shape[1],
        num_layers=_count(arrays, r"multimodal_encoder/x_layers_(\d+)/"),
        num_heads=fusion_q.shape[1],
        ff_dim=_require(arrays, "multimodal_encoder/x_layers_0/ff_layer/ffn_layer1/linear/w", 2).shape[1],
        num_query_tokens=query_tokens.shape[0],
        pooler_width=pool_q.shape[1] * pool_q.shape[2],
    )
    if pool_q.shape[1] != fusion_q.shape[1]:
        raise CheckpointError("pooler and fusion encoder have different head counts; not a MagicLens layout")
    try:
        config = MagicLensConfig(clip=ClipConfig(**clip), head=HeadConfig(**head))
    except (ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"array shapes do not describe a valid MagicLens: {err}") from err
    for named in NAMED_CONFIGS.values():
        if (named.clip, named.head) == (config.clip, config.head):
            return named
    return config


def _attention_qkv(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    kernels = [arrays[f"{prefix}/{p}/kernel"] for p in ("query", "key", "value")]
    biases = [arrays[f"{prefix}/{p}/bias"] for p in ("query", "key", "value")]
    width = kernels[0].shape[0]
    return {
        "in_proj_weight": np.concatenate([k.reshape(width, -1).T for k in kernels], axis=0),
        "in_proj_bias": np.concatenate([b.reshape(-1) for b in biases], axis=0),
        "out_proj.weight": arrays[f"{prefix}/out/kernel"].reshape(-1, width).T,
        "out_proj.bias": arrays[f"{prefix}/out/bias"],
    }


def _layer_norm(src: str, dst: str, arrays: dict[str, np.ndarray], offset: float = 0.0) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": arrays[f"{src}/scale"] + np.float32(offset), f"{dst}.bias": arrays[f"{src}/bias"]}


def _clip_tower(tower: str, layers: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One CLIP tower's transformer blocks in open_clip naming (`transformer.resblocks.{i}...`)."""
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        src = f"clip/{tower}/transformer/resblocks_{i}"
        dst = f"transformer.resblocks.{i}"
        out.update({f"{dst}.attn.{k}": v for k, v in _attention_qkv(f"{src}/attn", arrays).items()})
        out.update(_layer_norm(f"{src}/ln_1", f"{dst}.ln_1", arrays))
        out.update(_layer_norm(f"{src}/ln_2", f"{dst}.ln_2", arrays))
        for fc in ("c_fc", "c_proj"):
            out[f"{dst}.mlp.{fc}.weight"] = arrays[f"{src}/mlp/{fc}/kernel"].T
            out[f"{dst}.mlp.{fc}.bias"] = arrays[f"{src}/mlp/{fc}/bias"]
    return out


def _head_attention(src: str, dst: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in ("query", "key", "value"):
        w = arrays[f"{src}/{name}/w"]
        out[f"{dst}.{name}.weight"] = w.reshape(w.shape[0], -1).T
        out[f"{dst}.{name}.bias"] = arrays[f"{src}/{name}/b"].reshape(-1)
    post = arrays[f"{src}/post/w"]
    out[f"{dst}.post.weight"] = post.reshape(post.shape[0], -1)
    out[f"{dst}.post.bias"] = arrays[f"{src}/post/b"]
    return out


def map_official_arrays(arrays: dict[str, np.ndarray], config: MagicLensConfig) -> dict[str, np.ndarray]:
    """The official arrays renamed and reshaped into a `MagicLens` state dict (numpy values)."""
    sd: dict[str, np.ndarray] = {}
    visual = {
        "class_embedding": arrays["clip/visual/class_embedding"],
        "positional_embedding": arrays["clip/visual/positional_embedding"],
        "proj": arrays["clip/visual/proj/kernel"],
        "conv1.weight": arrays["clip/visual/conv1/kernel"].transpose(3, 2, 0, 1),
        **_layer_norm("clip/visual/ln_pre", "ln_pre", arrays),
        **_layer_norm("clip/visual/ln_post", "ln_post", arrays),
        **_clip_tower("visual", config.clip.vision_layers, arrays),
    }
    sd.update({f"clip.visual.{k}": v for k, v in visual.items()})
    text = {
        "token_embedding.weight": arrays["clip/text/token_embedding/embedding"],
        "positional_embedding": arrays["clip/text/positional_embedding"],
        "text_projection": arrays["clip/text/text_projection/kernel"],
        **_layer_norm("clip/text/ln_final", "ln_final", arrays),
        **_clip_tower("text", config.clip.text_layers, arrays),
    }
    sd.update({f"clip.{k}": v for k, v in text.items()})
    sd["clip.logit_scale"] = arrays["clip/logit_scale"]

    for i in range(config.head.num_layers):
        src = f"multimodal_encoder/x_layers_{i}"
        dst = f"head.layers.{i}"
        sd.update(_layer_norm(f"{src}/layer_norm", f"{dst}.attn_norm", arrays, offset=1.0))
        sd.update(_head_attention(f"{src}/self_attention", f"{dst}.attn", arrays))
        sd.update(_layer_norm(f"{src}/ff_layer/layer_norm", f"{dst}.ff_norm", arrays, offset=1.0))
        for ffn, linear in (("ffn_layer1", "ff_in"), ("ffn_layer2", "ff_out")):
            sd[f"{dst}.{linear}.weight"] = arrays[f"{src}/ff_layer/{ffn}/linear/w"].T
            sd[f"{dst}.{linear}.bias"] = arrays[f"{src}/ff_layer/{ffn}/bias/b"]
    pooler = "contrastive_multimodal_pooler"
    sd["head.pooler.query"] = arrays[f"{pooler}/pooling_attn_query"]
    sd.update(_head_attention(f"{pooler}/pool_attn", "head.pooler.attn", arrays))
    sd["head.pooler.attn.per_dim_scale.weight"] = arrays[f"{pooler}/pool_attn/per_dim_scale/per_dim_scale"]
    sd.update(_layer_norm(f"{pooler}/pool_attn_ln", "head.pooler.norm", arrays, offset=1.0))
    return sd


def _official_shapes(config: MagicLensConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every official array for `config` (the flax layout `map_official_arrays` reads)."""
    clip, head = config.clip, config.head
    shapes: dict[str, tuple[int, ...]] = {"clip/logit_scale": ()}

    def norm(prefix: str, width: int) -> None:
        shapes[f"{prefix}/scale"] = shapes[f"{prefix}/bias"] = (width,)

    def tower(name: str, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        hidden = round(width * mlp_ratio)
        for i in range(layers):
            src = f"clip/{name}/transformer/resblocks_{i}"
            for proj in ("query", "key", "value"):
                shapes[f"{src}/attn/{proj}/kernel"] = (width, heads, width // heads)
                shapes[f"{src}/attn/{proj}/bias"] = (heads, width // heads)
            shapes[f"{src}/attn/out/kernel"] = (heads, width // heads, width)
            shapes[f"{src}/attn/out/bias"] = (width,)
            norm(f"{src}/ln_1", width)
            norm(f"{src}/ln_2", width)
            shapes.update({f"{src}/mlp/c_fc/kernel": (width, hidden), f"{src}/mlp/c_fc/bias": (hidden,),
                           f"{src}/mlp/c_proj/kernel": (hidden, width), f"{src}/mlp/c_proj/bias": (width,)})

    def attention(src: str, width: int) -> None:
        for proj in ("query", "key", "value", "post"):
            shapes[f"{src}/{proj}/w"] = (head.embed_dim, head.num_heads, width // head.num_heads)
            shapes[f"{src}/{proj}/b"] = (head.num_heads, width // head.num_heads)
        shapes[f"{src}/post/b"] = (head.embed_dim,)

    width, patch = clip.vision_width, clip.vision_patch_size
    shapes.update({
        "clip/visual/class_embedding": (width,),
        "clip/visual/positional_embedding": ((clip.image_size // patch) ** 2 + 1, width),
        "clip/visual/proj/kernel": (width, clip.embed_dim),
        "clip/visual/conv1/kernel": (patch, patch, 3, width),
        "clip/text/token_embedding/embedding": (clip.vocab_size, clip.text_width),
        "clip/text/positional_embedding": (clip.context_length, clip.text_width),
        "clip/text/text_projection/kernel": (clip.text_width, clip.embed_dim),
    })
    norm("clip/visual/ln_pre", width)
    norm("clip/visual/ln_post", width)
    norm("clip/text/ln_final", clip.text_width)
    tower("visual", width, clip.vision_layers, clip.vision_heads, clip.vision_mlp_ratio)
    tower("text", clip.text_width, clip.text_layers, clip.text_heads, clip.text_mlp_ratio)
    for i in range(head.num_layers):
        src = f"multimodal_encoder/x_layers_{i}"
        norm(f"{src}/layer_norm", head.embed_dim)
        attention(f"{src}/self_attention", head.embed_dim)
        norm(f"{src}/ff_layer/layer_norm", head.embed_dim)
        shapes.update({f"{src}/ff_layer/ffn_layer1/linear/w": (head.embed_dim, head.ff_dim),
                       f"{src}/ff_layer/ffn_layer1/bias/b": (head.ff_dim,),
                       f"{src}/ff_layer/ffn_layer2/linear/w": (head.ff_dim, head.embed_dim),
                       f"{src}/ff_layer/ffn_layer2/bias/b": (head.embed_dim,)})
    pooler = "contrastive_multimodal_pooler"
    shapes[f"{pooler}/pooling_attn_query"] = (head.num_query_tokens, head.embed_dim)
    attention(f"{pooler}/pool_attn", head.pooler_width)
    shapes[f"{pooler}/pool_attn/per_dim_scale/per_dim_scale"] = (head.pooler_width // head.num_heads,)
    norm(f"{pooler}/pool_attn_ln", head.embed_dim)
    return shapes


def check_arrays(arrays: dict[str, np.ndarray], config: MagicLensConfig, path: str | PathLike) -> None:
    """Raise `CheckpointError` naming any missing, unexpected or mis-shaped array of `config`'s layout."""
    shapes = _official_shapes(config)
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{path}: checkpoint does not match the inferred architecture: "
                              f"missing {missing[:10]}, unexpected {extra[:10]}")
    misshaped = [f"{key!r} has shape {arrays[key].shape}, expected {shape}"
                 for key, shape in shapes.items() if arrays[key].shape != shape]
    if misshaped:
        raise CheckpointError(f"{path}: arrays do not match the inferred architecture: {'; '.join(misshaped[:10])}")


def official_model_id(path: str | PathLike) -> str:
    """The model id of an official checkpoint: derived from the file's sha256 (a converted folder keeps it)."""
    return f"magiclens-official-{file_sha256(Path(path))[:12]}"


def read_official_config(path: str | PathLike) -> MagicLensConfig:
    """The architecture of an official checkpoint from its array shapes, checked; no weight is copied."""
    arrays = read_official_arrays(path, shapes_only=True)
    config = infer_config(arrays)
    check_arrays(arrays, config, path)
    return config


def load_official_checkpoint(path: str | PathLike) -> MagicLens:
    """A released `.pkl` as a `MagicLens` in eval mode, float32, with every array checked.

    Raises `CheckpointError` naming any missing, unexpected or mis-shaped array.
    """
    arrays = read_official_arrays(path)
    config = infer_config(arrays)
    check_arrays(arrays, config, path)
    model = MagicLens(config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in map_official_arrays(arrays, config).items()}
    model.load_state_dict(state, strict=True)  # the checks above make a mismatch here a mapping bug
    model.model_id = official_model_id(path)
    return model.eval()
