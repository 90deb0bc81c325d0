"""The whole pipeline on the built-in sample series: quality floors held against ground truth."""

from __future__ import annotations

import json

import pytest

from yokai_pipeline.config import PipelineConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def demo_run(sample_series, tmp_path_factory):
    from flows.pipeline import pipeline_flow
    from yokai_pipeline import training

    ws = tmp_path_factory.mktemp("pipeline_ws")
    tiny = ws / "tiny_sd_model"
    training.build_tiny_sd_model(tiny)
    cfg = PipelineConfig()
    cfg.selection.tiers = ["S", "A", "B", "C"]
    cfg.training.enabled = True
    cfg.training.base_model = str(tiny)
    cfg.training.max_steps = 2
    cfg.training.resolution = 64
    cfg.training.device = "cpu"
    cfg.training.characters = ["char000"]
    state = pipeline_flow(
        str(sample_series / "episodes"),
        str(ws),
        cfg,
        ground_truth_dir=str(sample_series / "ground_truth"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    return ws, json.loads((ws / "summary.json").read_text())


def test_quality_floors(demo_run):
    _, summary = demo_run
    q = summary["quality"]
    assert q["segmentation"]["mean_iou"] >= 0.8
    assert q["clustering"]["ari"] >= 0.90
    assert q["clustering"]["purity"] >= 0.95
    assert "accuracy" in q["character_type"]


def test_tiers_follow_the_guide_and_rare_characters_stay_apart(demo_run):
    from yokai_pipeline import analysis, synthetic

    ws, summary = demo_run
    result = analysis.read_analysis(ws / "analysis" / "cluster_analysis.json")
    for c in result["clusters"]:
        expected = analysis.tier_for(c["images"], c["quality"]["poor"])
        assert c["tier"] == expected, c
    # every ground-truth character maps to its own cluster: the rare ones are never merged
    mapping = summary["quality"]["clusters_to_characters"]
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == {ch.id for ch in synthetic.CHARACTERS}
    tiers = {c["tier"] for c in result["clusters"]}
    assert {"S", "A", "B", "C", "D"} <= tiers


def test_dataset_validates_and_training_ran(demo_run):
    ws, summary = demo_run
    st = summary["stages"]
    assert st["validation"]["passed"] is True
    assert st["validation"]["valid_percent"] == 100.0
    assert st["augmentation"]["augmented_clusters"] >= 1  # tier C clusters are augmented
    assert st["captions"]["failed"] == 0
    assert st["packaging"]["commands"] and all(
        c.startswith("accelerate launch train_network.py --config_file ") for c in st["packaging"]["commands"]
    )
    assert st["training"]["characters"] == 1 and st["training"]["failed"] == 0
    assert list((ws / "trained_models" / "char000").glob("*.safetensors"))


def test_rerun_is_cached(demo_run, sample_series):
    """A second run of the finished series does no extraction or layering work."""
    from flows.pipeline import pipeline_flow

    ws, first = demo_run
    cfg = PipelineConfig.model_validate(json.loads((ws / "config.json").read_text()))
    state = pipeline_flow(str(sample_series / "episodes"), str(ws), cfg, return_state=True)
    assert state.is_completed()
    second = json.loads((ws / "summary.json").read_text())
    assert second["stages"]["frames"]["kept"] == first["stages"]["frames"]["kept"]
    assert second["stages"]["layers"] == {
        **first["stages"]["layers"],
        "seconds": second["stages"]["layers"]["seconds"],
    }
    assert second["stages"]["layers"]["seconds"] < first["stages"]["layers"]["seconds"]


def test_third_episode_joins_existing_clusters_incrementally(demo_run, sample_series, tmp_path):
    """Episodes 1-2 clustered, then episode 3 assigned: old ids unchanged, new layers land right."""
    import shutil

    from yokai_pipeline import clustering, synthetic
    from yokai_pipeline.config import ClusteringConfig
    from yokai_pipeline.workspace import Workspace

    src, _ = demo_run
    ws = Workspace(tmp_path / "ws")
    for part in ("episodes", "layered_frames", "embeddings"):
        shutil.copytree(src / part, ws.root / part)
    cfg = ClusteringConfig()
    clustering.cluster_layers(ws, ["ep01", "ep02"], cfg)
    before = {m["layer_id"]: m["cluster"] for m in clustering.read_clusters(ws)["members"]}

    stats = clustering.assign_incremental(ws, ["ep03"], cfg)
    doc = clustering.read_clusters(ws)
    after = {m["layer_id"]: m["cluster"] for m in doc["members"]}
    assert all(after[k] == v for k, v in before.items()), "existing members were renumbered"
    new = [m for m in doc["members"] if m["episode_id"] == "ep03"]
    assert new and stats["new_layers"] == len(new)
    labels = synthetic.ground_truth_labels(new, sample_series / "ground_truth")
    quality = clustering.evaluate_clusters(new, labels)
    assert quality["purity"] >= 0.95, quality
    # and the clusters the new layers joined are the ones holding the same characters already
    truth_all = synthetic.ground_truth_labels(doc["members"], sample_series / "ground_truth")
    assert clustering.evaluate_clusters(doc["members"], truth_all)["purity"] >= 0.95
