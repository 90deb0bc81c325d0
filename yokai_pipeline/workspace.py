"""The run workspace layout. See README "Workspace layout".

A workspace is a local (or network-mounted) folder, or an ``s3://bucket/prefix`` URL: then
``root`` is the local scratch mirror of that prefix (``$YOKAI_SCRATCH/<bucket>/<prefix>``) that
the stages read and write as they do any folder, and ``remote`` is the URL that
:mod:`yokai_pipeline.remote` pulls from and publishes to.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from yokai_pipeline.errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # a scheme of 2+ letters, so C:/ stays a path
_S3 = re.compile(r"^s3:/+(?P<rest>.*)$", re.IGNORECASE)  # also "s3:/b/x", what pathlib makes of "s3://b/x"
SCRATCH_ENV = "YOKAI_SCRATCH"


def scratch_dir() -> Path:
    """Where S3 workspaces are mirrored on this machine: ``$YOKAI_SCRATCH`` or ~/.cache/yokai/scratch."""
    return Path(os.environ.get(SCRATCH_ENV) or Path.home() / ".cache" / "yokai" / "scratch").resolve()


def _s3_url(text: str) -> str | None:
    """The canonical ``s3://bucket/prefix`` of an S3 workspace location, else None."""
    m = _S3.match(text)
    if m is None:
        return None
    bucket, _, prefix = m["rest"].partition("/")
    parts = [p for p in prefix.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts):
        raise ConfigError(f"workspace {text!r}: an S3 workspace is s3://bucket/prefix (no '.' or '..' parts)")
    return "s3://" + "/".join([bucket, *parts])


@dataclass(frozen=True)
class Workspace:
    """Paths of one run workspace. All manifests store paths relative to ``root``."""

    root: Path
    remote: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        text = str(self.root)
        url = _s3_url(text)
        if url is not None:
            object.__setattr__(self, "remote", url)
            object.__setattr__(self, "root", scratch_dir().joinpath(*url[len("s3://") :].split("/")))
            return
        if _URL.match(text):
            # Path would turn gs://bucket/x into a local folder named "gs:"
            raise ConfigError(
                f"workspace {text!r}: a workspace is a local or network-mounted folder or an s3://bucket/prefix "
                "URL (other object stores are not supported); for a multi-machine run use s3:// or mount "
                "a shared file system (NFS, EFS, Lustre) at the same path on every worker"
            )
        object.__setattr__(self, "root", Path(self.root).resolve())

    @classmethod
    def of(cls, workspace: str | Path | Workspace) -> Workspace:
        """``workspace`` itself, or the workspace a path or ``s3://`` URL names.

        A Workspace is passed through, not rebuilt from its root: an S3 workspace's root is its
        scratch mirror, which would make a local workspace of it.
        """
        return workspace if isinstance(workspace, Workspace) else cls(workspace)

    @property
    def location(self) -> str:
        """What the user named: the ``s3://`` URL, or the local folder."""
        return self.remote or str(self.root)

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
