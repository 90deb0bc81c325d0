"""The run workspace layout (local paths). See README "Workspace layout"."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Paths of one run workspace. All manifests store paths relative to ``root``."""

    root: Path

    def __post_init__(self) -> None:
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
        return self.layered_frames / "manifests" / f"{episode_id}.jsonl"

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
