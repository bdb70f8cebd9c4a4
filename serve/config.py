"""`ServeConfig`: what a llava-serve application is started with (the command's flags, and their defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_rt.runtime.image_processing import MAX_IMAGE_PIXELS

# On the CPU a vision tower runs as this many segments, one between each two decode steps: OneVision's SigLIP at 384 px
# takes about 0.85 s per tile in int8 on two cores, so a segment about 27 ms, near one decode step of four streams.
CPU_VISION_SEGMENTS = 32


@dataclass(frozen=True)
class ServeConfig:
    """What `llava-serve` is started with (see its `--help`). `served_model_name` defaults to the bundle directory's name."""

    bundle: Path
    served_model_name: str | None = None
    api_key: str | None = None
    max_concurrency: int = 4
    max_queue: int = 64
    threads: int | None = None
    precision: str | None = None
    device: str = "cpu"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_bytes: int = 32 << 20  # 32 MiB
    allowed_local_media_path: Path | None = None
    prefill_chunk: int = 32
    feature_cache_mb: float = 512.0
    vision_segments: int | None = None  # None: CPU_VISION_SEGMENTS on the CPU, the whole graph on a GPU

    @property
    def segments(self) -> int:
        """The vision graph's segments this server runs (see `Pipeline`'s `vision_segments`)."""
        if self.vision_segments is not None:
            return self.vision_segments
        return CPU_VISION_SEGMENTS if self.device == "cpu" else 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        if self.served_model_name is None:
            object.__setattr__(self, "served_model_name", self.bundle.resolve().name)


@dataclass(frozen=True)
class ClusterConfig:
    """How `llava-serve --replicas N` runs on Ray Serve (see its `--help`): replicas, their resources, the routing."""

    replicas: int
    ray_address: str | None = None
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    routing: str = "cache-affinity"

    @property
    def most_replicas(self) -> int:
        """The replicas there can be at once: `--autoscale`'s MAX, else `--replicas`."""
        return self.autoscale[1] if self.autoscale else self.replicas
