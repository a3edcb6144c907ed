"""A synthetic composed-retrieval world: small images of objects with known attributes, and instructions.

Every scene is a group of identical objects described by six attributes (colour, shape, size, position,
count, background). An instruction changes one or two attributes ("same shape but blue", "two of them,
on the left"); the target is the query's scene with those changes, so each query has exactly one right
answer among scenes. Everything is deterministic from the seed: row `i` of `triplets` is the same for
any `n`, and images are PNG bytes (lossless, identical across runs).

Held-out split: a (query scene, change) pair belongs to the benchmark or to training by a stable hash,
never both, so the benchmark measures composition on pairs the training triplets never show.

    world = SyntheticWorld(seed=0)
    rows = world.triplets(1000)                 # dicts: query_image, instruction, target_image, ...
    world.write_triplets("train.parquet", 20_000)
    bench = world.benchmark(100, pool_size=300) # a RetrievalSet: queries + a pool of candidate targets
    pages = world.web_pages(10)                 # pages grouping related images with alt text and captions
"""

from __future__ import annotations

import html
import io
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from magiclens_core.evaluation.retrieval_set import RetrievalSet

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
    "yellow": (235, 205, 40), "purple": (140, 60, 185), "orange": (240, 135, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
COUNTS: tuple[int, ...] = (1, 2, 3)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240), "black": (25, 25, 30), "gray": (128, 128, 128),
}
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "count", "background")

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_STREAM_TRIPLETS, _STREAM_BENCHMARK, _STREAM_POOL, _STREAM_PAGES, _STREAM_GALLERIES = 1, 2, 3, 4, 5
_HELD_OUT_BUCKETS = 10  # one bucket in ten of (scene, change) pairs is reserved for the benchmark
_SUPERSAMPLE = 4        # shapes are drawn at 4x and downsampled, for smooth edges


@dataclass(frozen=True, order=True)
class Scene:
    """One image's content: `count` identical objects stacked in one column of the picture."""

    colour: str
    shape: str
    size: str
    position: str
    count: int
    background: str

    @property
    def key(self) -> str:
        """A stable, readable id, e.g. `red-circle-small-left-2-white`."""
        return "-".join(str(getattr(self, name)) for name in ATTRIBUTES)

    def describe(self) -> str:
        """A plain-English caption, e.g. `two small red circles on the left, on a white background`."""
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        article = "a" if self.count == 1 else _NUMBER_WORDS[self.count]
        where = "in the middle" if self.position == "middle" else f"on the {self.position}"
        return f"{article} {self.size} {self.colour} {noun} {where}, on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene of the world, in a fixed order."""
    return [Scene(*values) for values in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, COUNTS, BACKGROUNDS)]


Change = tuple[tuple[str, str | int], ...]  # ((attribute, new value), ...) in ATTRIBUTES order


def apply_change(scene: Scene, change: Change) -> Scene:
    """The scene with the change's attributes replaced."""
    return replace(scene, **dict(change))


def _phrase(attribute: str, value: str | int, query: Scene, choice: int, keep: str | None) -> str:
    """One instruction fragment for one changed attribute; `keep` names an attribute said to stay."""
    it = "it" if query.count == 1 else "them"
    if attribute == "colour":
        options = [f"make {it} {value}", f"{value} instead"]
        if keep:
            options.append(f"same {keep} but {value}")
    elif attribute == "shape":
        noun = value if query.count == 1 else f"{value}s"
        article = "a " if query.count == 1 else ""
        options = [f"turn {it} into {article}{noun}", f"{article}{noun} instead"]
        if keep:
            options.append(f"same {keep} but {article}{noun}")
    elif attribute == "size":
        word = "bigger" if value == "large" else "smaller"
        options = [f"make {it} {word}", word]
    elif attribute == "position":
        where = "in the middle" if value == "middle" else f"on the {value}"
        options = [f"move {it} {where}", where]
    elif attribute == "count":
        options = ["just one", "only one"] if value == 1 else [f"{_NUMBER_WORDS[value]} of them",
                                                             f"make it {_NUMBER_WORDS[value]}"]
    else:
        options = [f"on a {value} background", f"change the background to {value}"]
    return options[choice % len(options)]


def instruction_for(query: Scene, change: Change, choice: int = 0) -> str:
    """The instruction text of a change; `choice` picks among equivalent phrasings."""
    changed = {attribute for attribute, _ in change}
    keep = next((a for a in ("shape", "colour") if a not in changed), None)
    parts = [_phrase(attribute, value, query, choice + i, keep) for i, (attribute, value) in enumerate(change)]
    return ", ".join(parts)


def _values(attribute: str) -> tuple:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS,
            "count": COUNTS, "background": tuple(BACKGROUNDS)}[attribute]


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass(frozen=True)
class PageImage:
    """An image of a web page with its metadata."""

    name: str
    data: bytes
    alt: str
    caption: str
    scene: str  # the scene key, or "" for page decoration (logos)


@dataclass(frozen=True)
class WebPage:
    """A synthetic web page: a title and a group of related images with alt text and captions."""

    url: str
    title: str
    images: tuple[PageImage, ...]

    def to_html(self) -> str:
        """The page as HTML; images are referenced by their `name` (relative file names)."""
        figures = "\n".join(
            f'<figure><img src="{html.escape(image.name)}" alt="{html.escape(image.alt)}">'
            f"<figcaption>{html.escape(image.caption)}</figcaption></figure>"
            for image in self.images)
        return (f"<!doctype html>\n<html><head><title>{html.escape(self.title)}</title></head>\n"
                f"<body><h1>{html.escape(self.title)}</h1>\n{figures}\n</body></html>\n")


class SyntheticWorld:
    """A deterministic generator of scenes, images, training triplets, benchmarks and web pages."""

    def __init__(self, seed: int = 0, image_size: int = 64) -> None:
        if image_size < 16:
            raise ValueError("image_size must be at least 16 pixels")
        self.seed = seed
        self.image_size = image_size
        self.scenes = all_scenes()

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def is_held_out(self, query: Scene, change: Change) -> bool:
        """Whether this (query scene, change) pair is reserved for the benchmark."""
        return _stable_hash(f"{self.seed}|{query.key}|{change}") % _HELD_OUT_BUCKETS == 0

    def render(self, scene: Scene, rng: np.random.Generator) -> Image.Image:
        """The scene as an RGB image; `rng` jitters the objects' placement by a few pixels."""
        big = self.image_size * _SUPERSAMPLE
        image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(image)
        radius = big * (0.10 if scene.size == "large" else 0.06)
        column = POSITIONS.index(scene.position)
        x = big * (column + 0.5) / 3 + rng.uniform(-0.03, 0.03) * big
        spacing = big / (scene.count + 1)
        for slot in range(scene.count):  # stacked in a column; the jitter never makes objects touch
            y = spacing * (slot + 1) + rng.uniform(-0.012, 0.012) * big
            self._draw_shape(draw, scene.shape, x + rng.uniform(-0.01, 0.01) * big, y, radius,
                             COLOURS[scene.colour])
        return image.reduce(_SUPERSAMPLE)

    @staticmethod
    def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float,
                    colour: tuple[int, int, int]) -> None:
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "square":
            side = r * 0.9
            draw.rectangle((x - side, y - side, x + side, y + side), fill=colour)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=colour)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour)

    def image_bytes(self, scene: Scene, rng: np.random.Generator) -> bytes:
        """The scene rendered as PNG bytes."""
        return _encode_png(self.render(scene, rng))

    def _random_change(self, query: Scene, rng: np.random.Generator) -> Change:
        how_many = 1 if rng.random() < 0.6 else 2
        attributes = sorted(rng.choice(len(ATTRIBUTES), size=how_many, replace=False))
        change = []
        for index in attributes:
            name = ATTRIBUTES[index]
            others = [v for v in _values(name) if v != getattr(query, name)]
            change.append((name, others[rng.integers(len(others))]))
        return tuple(change)

    def _pair(self, rng: np.random.Generator, held_out: bool) -> tuple[Scene, Change]:
        """A query scene and a change, drawn until they fall on the requested side of the split."""
        while True:
            query = self.scenes[rng.integers(len(self.scenes))]
            change = self._random_change(query, rng)
            if self.is_held_out(query, change) == held_out:
                return query, change

    def triplet(self, index: int) -> dict:
        """Training triplet number `index` (independent of how many are asked for)."""
        rng = self._rng(_STREAM_TRIPLETS, index)
        query, change = self._pair(rng, held_out=False)
        target = apply_change(query, change)
        return {
            "query_image": self.image_bytes(query, rng),
            "instruction": instruction_for(query, change, int(rng.integers(6))),
            "target_image": self.image_bytes(target, rng),
            "query_scene": query.key,
            "target_scene": target.key,
        }

    def iter_triplets(self, n: int, start: int = 0) -> Iterator[dict]:
        """Triplets `start` .. `start + n - 1`, one at a time."""
        for index in range(start, start + n):
            yield self.triplet(index)

    def triplets(self, n: int) -> list[dict]:
        """The first `n` training triplets: Parquet-ready dicts with `query_image` and `target_image`
        PNG bytes, `instruction`, and the scene keys `query_scene` / `target_scene`."""
        return list(self.iter_triplets(n))

    def write_triplets(self, path: str | PathLike, n: int, rows_per_group: int = 1024) -> Path:
        """Write `n` training triplets to one Parquet file; returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("query_image", pa.binary()), ("instruction", pa.string()),
                            ("target_image", pa.binary()), ("query_scene", pa.string()),
                            ("target_scene", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, n, rows_per_group):
                rows = list(self.iter_triplets(min(rows_per_group, n - start), start))
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        return path

    def benchmark(self, n_queries: int, pool_size: int | None = None) -> RetrievalSet:
        """A held-out benchmark: `n_queries` queries and a pool of distinct scenes (all queries' targets
        plus distractors, `pool_size` in all, default 3 × n_queries), exactly one right answer each."""
        rng = self._rng(_STREAM_BENCHMARK)
        pairs = [self._pair(rng, held_out=True) for _ in range(n_queries)]
        targets = sorted({apply_change(query, change) for query, change in pairs})
        pool_size = max(pool_size or 3 * n_queries, len(targets))
        if pool_size > len(self.scenes):
            raise ValueError(f"pool_size {pool_size} is over the {len(self.scenes)} scenes of the world")
        chosen = set(targets)
        rest = [scene for scene in self.scenes if scene not in chosen]
        extra = rng.choice(len(rest), size=pool_size - len(targets), replace=False)
        pool = sorted(chosen | {rest[i] for i in extra})
        pool_rng = self._rng(_STREAM_POOL)
        index = {scene: i for i, scene in enumerate(pool)}
        return RetrievalSet(
            query_ids=[f"q{i}-{query.key}" for i, (query, _) in enumerate(pairs)],
            query_images=[self.image_bytes(query, rng) for query, _ in pairs],
            instructions=[instruction_for(query, change, int(rng.integers(6))) for query, change in pairs],
            answers=[index[apply_change(query, change)] for query, change in pairs],
            pool_images=[self.image_bytes(scene, pool_rng) for scene in pool],
            pool_ids=[scene.key for scene in pool],
        )

    def write_benchmark(self, directory: str | PathLike, n_queries: int, pool_size: int | None = None) -> Path:
        """Write `benchmark(n_queries, pool_size)` as a retrieval-set folder; returns the folder."""
        return self.benchmark(n_queries, pool_size).write(directory)

    def web_pages(self, n: int, galleries: float = 0.0) -> list[WebPage]:
        """`n` pages, each with a small site logo (the kind of image a mining pipeline should drop) and 3-6
        images: by default category pages, whose images share one attribute (any two differ in about 3 of
        the other 5). A `galleries` share of the pages are instead variant galleries, as product pages are:
        one item and variants of it, each changing 1 or 2 attributes (never a held-out change of the item).
        Pages are the same for any `n`, and with `galleries=0` category pages only."""
        if not 0.0 <= galleries <= 1.0:
            raise ValueError("galleries is a share of the pages, from 0 to 1")
        return [self._gallery(index) if galleries and self._rng(_STREAM_GALLERIES, index).random() < galleries
                else self._page(index) for index in range(n)]

    def _gallery(self, index: int) -> WebPage:
        rng = self._rng(_STREAM_GALLERIES, index, 1)
        item, _ = self._pair(rng, held_out=False)
        variants, size = {item}, int(rng.integers(3, 7))
        while len(variants) < size:
            change = self._random_change(item, rng)
            if not self.is_held_out(item, change):
                variants.add(apply_change(item, change))
        label = f"{item.colour} {item.shape} variants"
        images = [PageImage(name=f"page{index}-{slot}.png", data=self.image_bytes(scene, rng), alt=scene.describe(),
                            caption=f"{label}: {scene.describe()}", scene=scene.key)
                  for slot, scene in enumerate(sorted(variants))]
        return self._with_logo(f"https://shapes.example/gallery/{item.key}/{index}", f"Gallery: {label}", index,
                               images)

    def _with_logo(self, url: str, title: str, index: int, images: list[PageImage]) -> WebPage:
        logo = Image.new("RGB", (16, 16), (30, 30, 30))
        images.append(PageImage(name=f"page{index}-logo.png", data=_encode_png(logo), alt="logo", caption="",
                                scene=""))
        return WebPage(url=url, title=title, images=tuple(images))

    def _page(self, index: int) -> WebPage:
        rng = self._rng(_STREAM_PAGES, index)
        attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
        values = _values(attribute)
        value = values[rng.integers(len(values))]
        members = [s for s in self.scenes if getattr(s, attribute) == value]
        picks = rng.choice(len(members), size=int(rng.integers(3, 7)), replace=False)
        label = f"{_NUMBER_WORDS[value]} of a kind" if attribute == "count" else f"{value} {attribute}"
        images = []
        for slot, pick in enumerate(sorted(picks)):
            scene = members[pick]
            images.append(PageImage(name=f"page{index}-{slot}.png", data=self.image_bytes(scene, rng),
                                    alt=scene.describe(), caption=f"{label}: {scene.describe()}",
                                    scene=scene.key))
        return self._with_logo(f"https://shapes.example/{attribute}/{value}/{index}",
                               f"Gallery: things with {label}", index, images)

    def write_web_pages(self, directory: str | PathLike, n: int, galleries: float = 0.0) -> Path:
        """Write `web_pages(n, galleries)` as `page{i}.html` with their images next to them; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for index, page in enumerate(self.web_pages(n, galleries)):
            (directory / f"page{index}.html").write_text(page.to_html())
            for image in page.images:
                (directory / image.name).write_bytes(image.data)
        return directory
