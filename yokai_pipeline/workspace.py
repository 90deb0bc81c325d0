"""The run workspace layout (local paths). See README "Workspace layout"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from yokai_pipeline.errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # a scheme of 2+ letters, so C:/ stays a path


@dataclass(frozen=True)
class Workspace:
    """Paths of one run workspace. All manifests store paths relative to ``root``."""

    root: Path

    def __post_init__(self) -> None:
        text = str(self.root)
        if _URL.match(text):  # also "s3:/b/x", what pathlib makes of "s3://b/x"
            # Path would turn s3://bucket/x into a local folder named "s3:"; stage outputs
            # are written with local file operations, so only a shared file system works
            raise ConfigError(
                f"workspace {text!r}: only a local or network-mounted folder is supported as the "
                "workspace (not an object-store URL); use s3:// for the ingest inbox, and mount a shared "
                "file system (NFS, EFS, Lustre) at the same path on every worker for a multi-machine run"
            )
        object.__setattr__(self, "root", Path(self.root).resolve())

    def rel(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def abs(self, rel: str | Path) -> Path:
        return self.root / rel

    # stage 1: frames
    def episode_dir(self, episode_id: str) -> Path:
        return self.root / "episodes" / episode_id

    def frames_manifest(self, episode_id: str) -> Path:
        return self.episode_dir(episode_id) / "frames.jsonl"

    # stage 2: layers
    @property
    def layered_frames(self) -> Path:
        return self.root / "layered_frames"

    def layers_manifest(self, episode_id: str) -> Path:
        """Layers the dataset uses: the episode's, less frames the series dedup dropped."""
        return self.layered_frames / "manifests" / f"{episode_id}.jsonl"

    def episode_layers_manifest(self, episode_id: str) -> Path:
        """Every layer of the episode's frames, as layering wrote it (before the series dedup)."""
        return self.layered_frames / "episode_manifests" / f"{episode_id}.jsonl"

    @property
    def series_dedup_file(self) -> Path:
        return self.root / "series_dedup.json"

    # stage 3: identity
    def embeddings_path(self, episode_id: str) -> Path:
        return self.root / "embeddings" / f"{episode_id}.npy"

    @property
    def character_clusters(self) -> Path:
        return self.root / "character_clusters"

    @property
    def reviewed_clusters(self) -> Path:
        """character_clusters with the review edits applied (what the dataset stages read)."""
        return self.root / "reviewed_clusters"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def selection_file(self) -> Path:
        return self.root / "selection.json"

    @property
    def augmented_clusters(self) -> Path:
        return self.root / "augmented_clusters"

    @property
    def training_data(self) -> Path:
        return self.root / "training_data"

    @property
    def trained_models(self) -> Path:
        return self.root / "trained_models"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def validation_report(self) -> Path:
        return self.root / "logs" / "validation_report.json"
