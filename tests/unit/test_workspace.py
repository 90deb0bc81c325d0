"""The workspace: an object-store URL other than s3:// is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from yokai_pipeline.errors import ConfigError
from yokai_pipeline.workspace import Workspace


@pytest.mark.parametrize("url", ["gs://bucket/x", "http://s3.local:8333/yokai"])
def test_object_store_workspace_is_refused_with_what_is_supported(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="shared file system") as err:
        Workspace(url)
    assert url in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing (such as a folder named 's3:') is created"
    with pytest.raises(ConfigError):  # what a typer/pathlib Path option makes of the URL
        Workspace(Path(url))


def test_local_workspace_paths(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.layers_manifest("ep").parent.name == "manifests"
    assert ws.episode_layers_manifest("ep") != ws.layers_manifest("ep")


def test_yokai_run_refuses_an_unsupported_workspace_at_start(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from yokai_pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "episodes").mkdir()
    res = CliRunner().invoke(app, ["run", str(tmp_path / "episodes"), "--workspace", "gs://yokai/ws"])
    assert res.exit_code == 2, res.output
    assert "gs:" in res.output and "shared file system" in " ".join(res.output.split())
    assert not (tmp_path / "gs:").exists()
