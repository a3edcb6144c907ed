"""The application's own options: the `args:` of `config.yaml` (or the dict given to `build_app`).

Unknown keys are refused, so a typo fails at deploy time instead of being silently ignored.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from magiclens_core.images.decode import DEFAULT_MAX_PIXELS
from magiclens_core.images.sources import UriPolicy
from magiclens_core.model.precision import Precision


class AppConfig(BaseModel):
    """What the MagicLens search application serves and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model folder or official .pkl, readable from every replica")
    db: str = Field(description="LanceDB URI (local folder or object storage)")
    table: str = Field(description="image table written by jobs.index")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when Ray gave the replica a GPU (ray_actor_options.num_gpus), else CPU")
    precision: Precision = "auto"
    preprocess: Literal["model", "official_eval"] = Field(
        "model", description="must match the preprocessing the table was indexed with")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per replica (default: torch's)")
    max_batch_size: int = Field(16, ge=1, description="queries embedded together (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long a batch waits to fill (0: it takes "
                                                               "what queued while the last batch ran)")
    refresh_interval_s: float = Field(10.0, ge=0, description="how often replicas look for a newer table version")
    default_k: int = Field(10, ge=1)
    max_k: int = Field(1000, ge=1)
    max_image_bytes: int = Field(20_000_000, ge=1, description="largest uploaded image file")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest image (width x height)")
    min_image_side: int = Field(1, ge=1, description="smallest accepted image side")
    max_instruction_tokens: int = Field(77, ge=2, le=77, description="the text tower's context, start/end included")
    thumbnail_side: int = Field(256, ge=16, le=2048, description="default longest side of /v1/images/{id}")
    allowed_uri_prefixes: tuple[str, ...] = Field(
        (), description="folders (relative ones from where the application is built) and URI prefixes "
                        "(s3://bucket/photos) whose images the table's `uri` column may name; /v1/images/{id} and "
                        "`image_id` queries read nothing else (empty: no stored image is read)")
    api_key: str | None = Field(None, description="when set, every route but /healthz and / needs "
                                                  "`Authorization: Bearer <api_key>`")
    memory_index: Literal["faiss"] | None = Field(
        None, description="faiss: each replica searches an HNSW graph held in memory beside the table "
                          "(kept in step with its versions; `pip install magiclens-ray[search]`)")
    search_timeout_s: float = Field(10.0, gt=0, description="longest a table search may take; a slower one "
                                                            "answers 503 `search_timeout`")

    @field_validator("allowed_uri_prefixes")
    @classmethod
    def _check_prefixes(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        UriPolicy.allowing(prefixes)  # refuses a prefix with a query string, credentials or an unknown scheme
        return tuple(prefix if "://" in prefix else os.path.abspath(prefix) for prefix in prefixes)

    def uri_policy(self) -> UriPolicy:
        """What the replicas may read of the URIs the table stores."""
        return UriPolicy.allowing(self.allowed_uri_prefixes)

    def missing_sources(self) -> list[str]:
        """What of the model and the table is not there (checked without creating anything)."""
        from magiclens_core.search.store import table_exists

        missing = []
        if "://" not in self.model and not os.path.exists(self.model):
            missing.append(f"model: no model folder or .pkl at {self.model}")
        if not table_exists(self.db, self.table):
            missing.append(f"table: no table {self.table!r} in {self.db}")
        return missing

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is over max_k ({self.max_k})")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it out to serve without a key")
        return self
