"""Held-out retrieval sets: queries and a pool of candidate targets, one right answer each. They are
scored as the `synthetic` benchmark (`benchmarks/synthetic.py`), by training validation and `jobs.evaluate`.

On disk a retrieval set is a folder with `queries.parquet` (`query_id`, `query_image`, `instruction`,
`target_id`) and `pool.parquet` (`id`, `image`); image cells are encoded bytes, paths or URIs. A triplets file
(`query_image`, `instruction`, `target_image`) is a retrieval set too: its pool is the distinct target
images (by content), and each query's answer is its own target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from magiclens_core.images.identity import content_id
from magiclens_core.images.sources import image_bytes_or_path

QUERIES_FILE = "queries.parquet"
POOL_FILE = "pool.parquet"


@dataclass
class RetrievalSet:
    """Queries (image + instruction) with the index of their one right answer in the pool."""

    query_ids: list[str]
    query_images: list[bytes | str]
    instructions: list[str]
    answers: list[int]
    pool_images: list[bytes | str]
    pool_ids: list[str]

    def __post_init__(self) -> None:
        if not len(self.query_ids) == len(self.query_images) == len(self.instructions) == len(self.answers):
            raise ValueError("query ids, images, instructions and answers differ in length")
        if len(self.pool_images) != len(self.pool_ids):
            raise ValueError("pool images and ids differ in length")
        if len(set(self.pool_ids)) != len(self.pool_ids):
            raise ValueError("pool ids are not unique")
        if any(not 0 <= answer < len(self.pool_ids) for answer in self.answers):
            raise ValueError("an answer is outside the pool")

    def __len__(self) -> int:
        return len(self.instructions)

    def write(self, directory: str | PathLike) -> Path:
        """Write `queries.parquet` and `pool.parquet` into `directory`; returns it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        image_type = pa.binary() if all(isinstance(v, bytes) for v in self.query_images + self.pool_images) \
            else pa.string()
        queries = pa.table({
            "query_id": pa.array(self.query_ids, pa.string()),
            "query_image": pa.array(self.query_images, image_type),
            "instruction": pa.array(self.instructions, pa.string()),
            "target_id": pa.array([self.pool_ids[a] for a in self.answers], pa.string()),
        })
        pool = pa.table({"id": pa.array(self.pool_ids, pa.string()),
                         "image": pa.array(self.pool_images, image_type)})
        pq.write_table(queries, directory / QUERIES_FILE)
        pq.write_table(pool, directory / POOL_FILE)
        return directory


def _image_id(value: bytes | str) -> str:
    """The content id of an image cell (bytes, a path or a URI)."""
    data = image_bytes_or_path(value)
    return content_id(data if isinstance(data, bytes) else Path(data).read_bytes())


def from_triplets(query_images: Sequence, instructions: Sequence[str], target_images: Sequence) -> RetrievalSet:
    """A retrieval set from held-out triplets: the pool is their distinct target images."""
    pool_index: dict[str, int] = {}
    pool_images: list = []
    answers = []
    for image in target_images:
        key = _image_id(image)
        if key not in pool_index:
            pool_index[key] = len(pool_images)
            pool_images.append(image)
        answers.append(pool_index[key])
    return RetrievalSet([str(i) for i in range(len(answers))], list(query_images), list(instructions), answers,
                        pool_images, list(pool_index))


def read_retrieval_set(path: str | PathLike) -> RetrievalSet:
    """A retrieval-set folder, or a Parquet triplets file (or folder of Parquet files)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if (path / QUERIES_FILE).is_file():
        queries = pq.read_table(path / QUERIES_FILE).to_pydict()
        pool = pq.read_table(path / POOL_FILE).to_pydict()
        index = {pool_id: i for i, pool_id in enumerate(pool["id"])}
        missing = [t for t in queries["target_id"] if t not in index]
        if missing:
            raise ValueError(f"{path}: {len(missing)} query targets are not in the pool, e.g. {missing[0]!r}")
        return RetrievalSet(queries["query_id"], queries["query_image"], queries["instruction"],
                            [index[t] for t in queries["target_id"]], pool["image"], pool["id"])
    if not path.exists():
        raise FileNotFoundError(f"validation set not found: {path}")
    table = pq.read_table(path, columns=["query_image", "instruction", "target_image"]).to_pydict()
    return from_triplets(table["query_image"], table["instruction"], table["target_image"])
