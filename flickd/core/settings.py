"""The one settings object. Nothing else in flickd reads ``os.environ``.

Every field is read from an environment variable prefixed ``FLICKD_`` (``FLICKD_DATABASE_URL``,
``FLICKD_BROKER_URL`` …). With none set, flickd runs on the *embedded default*: a SQLite
database and blob store under ``./flickd-data`` and Celery tasks executed in-process.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLICKD_", env_nested_delimiter="__", extra="ignore"
    )

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Path("flickd-data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/flickd.db
    broker_url: str | None = None  # default: none -> tasks run in-process (embedded mode)
    result_backend: str | None = None
    # Prefix of every Redis key Celery uses, so that several deployments (or test sessions and
    # benchmarks) can share one Redis without taking each other's messages.
    broker_prefix: str = ""
    # Blobs, crops, model versions and index files: file:///srv/flickd, s3://bucket/prefix,
    # gs://bucket/prefix (fsspec; credentials from the backend's own environment). Default:
    # the data directory itself. With a shared storage URL the data directory is only a cache.
    storage_url: str | None = None
    # Bytes the local read-through cache of a remote storage may hold (LRU beyond that).
    cache_max_bytes: int = 10 * 1024**3
    # Seconds between checks of the published index (and with it the model version it was
    # built with): a serving process switches within this bound, without a restart.
    index_poll_seconds: float = 2.0
    # Freshness of a serving process (flickd/services/freshness.py): seconds between its polls
    # of the database for new vectors, delistings and retired images; the re-read margin for
    # rows that commit after later-stamped ones; and the full pass that catches anything else.
    freshness_poll_seconds: float = 2.0
    freshness_overlap_seconds: float = 30.0
    freshness_resync_seconds: float = 600.0
    # The reconciler asks for a full index build when the vectors added since the served build,
    # plus the crops it holds that left search, pass this share of that build's vectors.
    rebuild_drift_share: float = 0.2

    # --- Celery reliability --------------------------------------------------------------------
    # Seconds a delivered, unacknowledged message stays invisible before Redis re-delivers it.
    # Must exceed the longest task (time limits below), or a slow task is run twice.
    visibility_timeout: int = 3600
    # How often a worker sweeps Redis for messages whose worker died (unacked past the timeout).
    redelivery_sweep_seconds: int = 30
    task_soft_time_limit: int = 900
    task_time_limit: int = 960
    # The reconciler (`flickd scheduler`): work the database says is due, whose last progress
    # (its last hand-off, or the last heartbeat of the worker holding it) is older than the
    # lease, has lost its message and is sent again. Below the visibility timeout, so the
    # reconciler re-drives a dead worker's batch before Redis would.
    lease_seconds: int = 300
    reconcile_interval: int = 30  # seconds between reconciler passes
    # Times one stage may be attempted for an image (each delivery that starts the stage
    # counts); past it the image fails with reason attempts_exhausted.
    max_stage_attempts: int = 5
    # Rows one reconciler pass looks at per kind of work (each pass is bounded).
    reconcile_batch_limit: int = 50_000
    # Tries to send a message while the broker is away (about 30 s with 8), before the sender
    # gives up and leaves the work, safe in the database, to the reconciler.
    publish_retries: int = 8

    # --- producer ------------------------------------------------------------------------------
    feed_chunk_rows: int = 50_000
    download_batch_size: int = 200  # images per download message
    max_url_length: int = 2048
    # Catalog sync. A `--full` feed is refused (nothing delisted, the reason on the run) when
    # it would delist more than this share of its catalog's listed products, unless forced.
    max_delist_share: float = 0.2
    # Delisted products leave search at once; their rows, crops and blobs are kept this long
    # (a product that returns is relisted without a download), then the reconciler purges them.
    delist_grace_seconds: int = 7 * 24 * 3600

    # --- downloads -----------------------------------------------------------------------------
    # CIDR networks the SSRF guard lets through although they are private/loopback/…
    allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    download_threads: int = 32
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    download_deadline: float = 30.0  # whole-body wall-clock cap, defeats slow trickles
    max_download_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    max_attempts: int = 4  # per image, first try included
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 30.0
    max_image_pixels: int = 50_000_000
    user_agent: str = "flickd/0.1 (+catalog image fetcher)"

    # --- pipeline ------------------------------------------------------------------------------
    # The last stage images go through: "download" stops after storing the bytes (no models
    # needed), "analyze" goes on to detection, colour, prompts and CLIP embeddings.
    last_stage: Literal["download", "analyze"] = "analyze"

    # --- vision (GPU workers) ------------------------------------------------------------------
    device: str | None = None  # "cuda", "cuda:1", "cpu"; default: CUDA when present
    mixed_precision: bool = True  # bf16/fp16 autocast on CUDA (never on CPU)
    detector_model: str = "valentinafeve/yolos-fashionpedia"  # hub id, local dir, or "none"
    embedding_model: str = "openai/clip-vit-base-patch32"
    detection_threshold: float = 0.5
    analyze_batch_size: int = 16
    min_crop_side: int = 16
    crop_merge_iou: float = 0.7

    # --- image geometry (every image that meets a model: downloads, analysis, search queries) --
    # An image whose longer side exceeds this many times its shorter one is padded for the
    # models (the short side, with the image's edge colour), so the product stays whole.
    max_aspect_ratio: float = 20.0
    # Images whose shorter side is below this many pixels are refused (bad_geometry).
    min_image_side: int = 8
    # Bytes the detector's and CLIP's preprocessing may allocate for the shapes they produce
    # from a padded image (flickd/fetching/geometry.py derives the padding from it).
    max_preprocess_bytes: int = 256 * 1024 * 1024

    # --- search (API and `flickd search`) ------------------------------------------------------
    # Cosine similarity at or above which a hit is an "exact" / "similar" match; below: "weak".
    match_exact: float = 0.9
    match_similar: float = 0.75
    max_upload_bytes: int = 10 * 1024 * 1024  # image uploads and image-URL queries
    search_max_items: int = 8  # detected items searched per query image, best scores first
    # Micro-batching of concurrent queries (flickd/services/batching.py): a batch waits at most
    # this long for more queries after its first, and holds at most search_max_batch of them.
    search_batch_window_ms: float = Field(default=2.0, ge=0)
    search_max_batch: int = Field(default=32, ge=1)
    text_cache_size: int = Field(default=4096, ge=0)  # query texts whose vectors are kept (LRU)
    # How query texts are embedded (models/query_text.py): `auto` is bfloat16 on a CPU with
    # bf16 instructions (about 3x faster, vectors within cosine 0.9999 of float) and float else.
    query_text_precision: Literal["auto", "float", "bfloat16"] = "auto"
    # Threads torch uses in an API process (default: one per core). `flickd api --workers N`
    # sets it to cores / N when it is not set.
    torch_threads: int | None = Field(default=None, ge=1)

    # --- video search (`flickd search --video`, POST /search/video) ---------------------------
    # Frames kept per second of video at most, plus one at each scene change: a frame whose
    # colour-histogram distance from the last kept frame is at least the threshold (0..1).
    video_max_fps: float = 2.0
    video_scene_threshold: float = 0.35
    # Of the sampled frames, the models analyse each scene change and, between them, a frame
    # whose grey thumbnail moved at least this much (mean absolute difference, 0..1; 0 analyses
    # every sampled frame) from the last analysed frame, or 1/video_min_fps seconds after it
    # (0: never by age alone). The others carry the last analysed frame's items.
    video_motion_threshold: float = 0.10
    video_min_fps: float = 0.25
    # The short side the detector sees video frames at (its long-side cap scaled alike); 0: the
    # detector processor's own (the base YOLOS: 512, long side 864). Never above the processor's.
    # Off by default: on bench/video.py's clip 352 cut the detector's time ~40% but recall of
    # the products shown moved with it (0.77 at 512, 0.67 at 416, 0.73 at 352, random weights).
    video_detector_shortest_edge: int = Field(default=0, ge=0)
    # Hard caps: a longer clip is analysed up to the cap and the result says so; a frame over
    # the pixel cap is refused (video_too_large); bytes are counted while they stream in.
    video_max_seconds: float = 600.0
    video_max_frames: int = 1200  # sampled frames per video
    video_max_pixels: int = 3840 * 2160  # per frame
    video_max_upload_bytes: int = 200 * 1024 * 1024  # uploads and video-URL downloads
    # A clip up to this long is answered in the request; a longer one becomes a job on the gpu
    # queue with a status endpoint.
    video_inline_seconds: float = 20.0
    video_batch_size: int = 16  # analysed frames per detector and embedder call
    # Detections in nearby sampled frames join one track when their coarse labels agree, their
    # boxes overlap at least this much (IoU) or their embeddings are at least this similar,
    # and at most this many sampled frames lie between them.
    track_min_iou: float = 0.3
    track_min_similarity: float = 0.85
    track_max_gap: int = 2

    # --- the final task: fine-tune, re-embed, index -------------------------------------------
    # auto: fine-tune when enough new crops arrived, else refresh the index; index: only the
    # index; off: nothing runs when a run finishes.
    finalize: Literal["auto", "index", "off"] = "auto"
    finetune_min_new_crops: int = 5000
    train_epochs: int = 3
    train_batch_size: int = 64
    train_lr: float = 1e-5
    train_weight_decay: float = 0.1
    train_warmup_fraction: float = 0.1
    train_grad_clip: float = 1.0
    train_eval_fraction: float = 0.2
    train_seed: int = 0
    promotion_min_improvement: float = 0.01
    reembed_batch_size: int = 256

    # --- misc ----------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    # --- operations: Flower, metrics -----------------------------------------------------------
    # "user:password" for `flickd flower`, which refuses to start without it: the dashboard can
    # revoke tasks and shut workers down. A plain str (not SecretStr) so that child processes
    # receive it through FLICKD_* variables like every other setting.
    flower_basic_auth: str | None = None
    # A worker serves its per-stage timing histograms on this port (none: not served).
    worker_metrics_port: int | None = None

    @model_validator(mode="after")
    def _check_time_limits(self) -> Settings:
        # A task still running when its message becomes visible again would run twice at once.
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"task_time_limit ({self.task_time_limit}s) must be below visibility_timeout "
                f"({self.visibility_timeout}s)"
            )
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("task_soft_time_limit must be below task_time_limit")
        # Past the visibility timeout Redis re-delivers by itself; the lease must come first.
        if not 0 < self.lease_seconds < self.visibility_timeout:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}s) must be above 0 and below "
                f"visibility_timeout ({self.visibility_timeout}s)"
            )
        if self.cache_max_bytes < 1 or self.index_poll_seconds < 0:
            raise ValueError("cache_max_bytes must be above 0, index_poll_seconds not negative")
        if min(self.freshness_poll_seconds, self.freshness_overlap_seconds) < 0 or not (
            self.rebuild_drift_share > 0 and self.freshness_resync_seconds > 0
        ):
            raise ValueError(
                "freshness_poll_seconds and freshness_overlap_seconds must not be negative, "
                "freshness_resync_seconds and rebuild_drift_share must be above 0"
            )
        if not 0.0 <= self.max_delist_share <= 1.0 or self.delist_grace_seconds < 0:
            raise ValueError("max_delist_share must be in 0..1, delist_grace_seconds not negative")
        if self.reconcile_interval <= 0 or self.max_stage_attempts < 1:
            raise ValueError("reconcile_interval must be above 0, max_stage_attempts at least 1")
        return self

    @model_validator(mode="after")
    def _check_match_thresholds(self) -> Settings:
        # Swapped thresholds would label every "similar" hit "exact" and none "similar".
        if not -1.0 <= self.match_similar <= self.match_exact <= 1.0:
            raise ValueError("need -1 <= match_similar <= match_exact <= 1")
        return self

    @model_validator(mode="after")
    def _check_geometry(self) -> Settings:
        if self.max_aspect_ratio < 1.0 or self.min_image_side < 1:
            raise ValueError("max_aspect_ratio must be at least 1, min_image_side at least 1")
        if self.max_preprocess_bytes < 16 * 1024 * 1024:
            raise ValueError("max_preprocess_bytes must be at least 16 MiB (16777216)")
        return self

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # raises ValueError with a clear message
        return value

    # --- derived -------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when no broker is configured: tasks run in-process."""
        return not self.broker_url

    @property
    def finalize_enabled(self) -> bool:
        """True when a finished run gets its final task (fine-tune, re-embed, index)."""
        return self.last_stage == "analyze" and self.finalize != "off"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Prefer psycopg 3 for plain postgres URLs.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.data_dir / 'flickd.db').resolve()}"

    @property
    def storage_root(self) -> str:
        """The storage URL in use: ``FLICKD_STORAGE_URL``, else ``file://<data dir>``."""
        if self.storage_url:
            url = self.storage_url.strip().rstrip("/")
            return url if "://" in url else f"file://{Path(url).resolve()}"
        return f"file://{self.data_dir.resolve()}"

    @property
    def cache_dir(self) -> Path:
        """This process's read-through cache of a remote storage (may be wiped at any time)."""
        return self.data_dir / "cache"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def index_dir(self) -> Path:
        """Versioned FAISS index files and the ``current.json`` pointer to the served one."""
        return self.data_dir / "index"

    @property
    def models_dir(self) -> Path:
        """Fine-tuned model versions, one directory each."""
        return self.data_dir / "models"

    @property
    def allowed_ip_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        # Read by the SSRF check for every image and redirect hop: parsed once per list.
        return list(_ip_networks(tuple(self.allowed_networks)))


@lru_cache(maxsize=64)
def _ip_networks(
    networks: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(net, strict=False) for net in networks)


class _LogLevel(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLICKD_", extra="ignore")
    log_level: str = "INFO"


def debug_requested() -> bool:
    """FLICKD_LOG_LEVEL=DEBUG, read on its own: it must work even when another setting is
    what is broken (the command line then shows tracebacks)."""
    try:
        return _LogLevel().log_level.upper() == "DEBUG"
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
