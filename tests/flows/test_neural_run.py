"""`yokai run` end to end with the anime IS-Net and CCIP backends, tiny random models for the weights."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_run_with_isnet_and_ccip_completes(tmp_path):
    torch = pytest.importorskip("torch", reason="the isnet backend needs torch")
    pytest.importorskip("onnxruntime", reason="the ccip backend needs onnxruntime on CPU")
    from typer.testing import CliRunner

    from tests.unit import onnx_models
    from yokai_pipeline import synthetic
    from yokai_pipeline.cli import app
    from yokai_pipeline.models import ccip, isnet

    series = tmp_path / "series"
    synthetic.generate_series(series, seed=3, episodes=1, seconds=8.0)
    torch.manual_seed(0)
    weights = tmp_path / "isnetis.pth"
    torch.save(isnet.build_isnet(width=4).state_dict(), weights)
    ccip_dir = tmp_path / "ccip"
    ccip_dir.mkdir()
    onnx_models.ccip_feature(ccip_dir / ccip.FEATURE_FILE)
    onnx_models.ccip_metric(ccip_dir / ccip.METRIC_FILE)
    (ccip_dir / ccip.METRICS_JSON).write_text(json.dumps({"threshold": 0.004}))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "layering": {
                    "backend": "isnet",
                    "weights": str(weights),
                    "device": "cpu",
                    "isnet_input_size": 64,
                },
                "embedding": {"backend": "ccip", "ccip_model": str(ccip_dir), "device": "cpu"},
                "selection": {"tiers": ["S", "A", "B", "C", "D"]},
            }
        )
    )
    ws = tmp_path / "ws"
    res = CliRunner().invoke(
        app, ["run", str(series / "episodes"), "--workspace", str(ws), "--config", str(config)]
    )
    assert res.exit_code == 0, res.output
    [sidecar] = (ws / "embeddings").glob("*.json")
    assert json.loads(sidecar.read_text())["backend"] == "ccip"
    doc = json.loads((ws / "character_clusters" / "clusters.json").read_text())
    assert doc["embedding"]["backend"] == "ccip" and doc["embedding"]["ccip"]["threshold"] == 0.004
    assert (ws / "summary.json").is_file()
    assert any((ws / "layered_frames" / "masks").rglob("*.png"))
