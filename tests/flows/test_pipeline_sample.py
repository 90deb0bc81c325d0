"""The whole pipeline on the built-in sample series: quality floors held against ground truth."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from yokai_pipeline.config import PipelineConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


# The guide's tables, written out here so the product is checked against them, not against itself.
GUIDE_TIERS = (("S", 100), ("A", 50), ("B", 20), ("C", 15), ("D", 0))  # tier: at least this many
GUIDE_ROWS = ((5, 10, 30, 30, 5e-5), (11, 20, 20, 25, 8e-5), (21, 50, 15, 20, 1e-4),
              (51, 100, 10, 15, 1e-4), (101, 10**9, 5, 12, 1e-4))  # images, repeat, epochs, UNet LR  # fmt: skip


def guide_tier(n: int) -> str:
    return next(t for t, least in GUIDE_TIERS if n >= least)


def guide_row(n: int) -> tuple[int, int, float]:
    return next((rep, ep, lr) for lo, hi, rep, ep, lr in GUIDE_ROWS if lo <= n <= hi)


@pytest.fixture(scope="module")
def demo_run(sample_series, tmp_path_factory):
    """The pipeline with the demo's own settings (``yokai demo``), a 2-step training."""
    from flows.pipeline import pipeline_flow
    from yokai_pipeline.commands.run import demo_config

    ws = tmp_path_factory.mktemp("pipeline_ws")
    cfg = demo_config(PipelineConfig(), ws)
    cfg.training.max_steps = 2
    state = pipeline_flow(
        str(sample_series / "episodes"),
        str(ws),
        cfg,
        ground_truth_dir=str(sample_series / "ground_truth"),
        return_state=True,
    )
    assert state.is_completed(), state.message
    return ws, json.loads((ws / "summary.json").read_text())


def test_quality_figures_the_readme_quotes(demo_run):
    # README: mean IoU 0.99, ARI 0.99 / purity 1.00, character type right for 9 of 10 clusters
    _, summary = demo_run
    q = summary["quality"]
    assert q["segmentation"]["mean_iou"] >= 0.985
    assert q["clustering"]["ari"] >= 0.985
    assert q["clustering"]["purity"] >= 0.995


def test_types_and_tiers_against_ground_truth(demo_run, sample_series):
    from yokai_pipeline import analysis, clustering, synthetic
    from yokai_pipeline.workspace import Workspace

    ws, summary = demo_run
    result = analysis.read_analysis(ws / "analysis" / "cluster_analysis.json")
    members = clustering.read_clusters(Workspace(ws))["members"]
    labels = synthetic.ground_truth_labels(members, sample_series / "ground_truth")
    appearances = Counter(v for v in labels.values() if v is not None)  # layers per true character
    truth = {}  # cluster -> its ground-truth character (majority of its members)
    for c in result["clusters"]:
        votes = Counter(labels[m["layer_id"]] for m in members if m["cluster"] == c["id"])
        truth[c["id"]] = votes.most_common(1)[0][0]
    # one cluster per character: the rare ones are never merged or lost
    assert sorted(truth.values()) == sorted(ch.id for ch in synthetic.CHARACTERS)
    spec = {ch.id: ch for ch in synthetic.CHARACTERS}
    # type: right for at least 9 of the 10 clusters (README)
    right = sum(c["type"] == spec[truth[c["id"]]].type for c in result["clusters"])
    assert right >= 9 and len(result["clusters"]) == 10
    # tiers: the guide's table on each character's true number of layers; two per tier (README),
    # a human and a yokai in each (the sample series is built that way)
    for c in result["clusters"]:
        assert c["tier"] == guide_tier(appearances[truth[c["id"]]]), c
    by_tier = Counter(c["tier"] for c in result["clusters"])
    assert by_tier == {"S": 2, "A": 2, "B": 2, "C": 2, "D": 2}
    for tier in "SABCD":
        kinds = {spec[truth[c["id"]]].type for c in result["clusters"] if c["tier"] == tier}
        assert kinds == {"human", "yokai"}, tier


def test_packaged_characters_follow_the_guides_rows(demo_run):
    """Every packaged character's repeat folder, epochs and LR are the guide's row for its originals."""
    import tomllib

    ws, _ = demo_run
    selection = json.loads((ws / "selection.json").read_text())
    assert sorted(c["tier"] for c in selection["characters"]) == sorted("SSAABBCC")  # default: S-C
    data = ws / "training_data" / "characters"
    folders = {p.name.split("_", 1)[1]: p for p in data.iterdir() if p.is_dir() and p.name[0].isdigit()}
    assert len(folders) == 8
    rows_seen = set()
    for char in selection["characters"]:
        name = char["name"]
        assert name == f"char_{char['cluster']:03d}" and char["trigger"] == f"char{char['cluster']:03d}"
        originals = len(list((ws / "character_clusters" / f"cluster_{char['cluster']:03d}").glob("*.png")))
        repeat, epochs, unet_lr = guide_row(originals)
        rows_seen.add((repeat, epochs))
        assert folders[name].name == f"{repeat}_{name}", (name, originals)
        args = tomllib.loads((data / "configs" / f"{name}_config.toml").read_text())
        flat = {k: v for sec in args.values() for k, v in sec.items()}
        assert flat["max_train_epochs"] == epochs
        factor = 1.1 if char["type"] == "yokai" else 1.0
        assert flat["unet_lr"] == pytest.approx(unet_lr * factor)
        assert flat["network_dim"] == (48 if char["type"] == "yokai" else 32)
        captions = [p.read_text() for p in folders[name].glob("*.txt")]
        assert captions and all(t.startswith(char["trigger"] + ", ") for t in captions)
        if char["tier"] == "C":  # 15-19 originals: the guide's 11-20 row
            assert (repeat, epochs) == (20, 25)
    assert (20, 25) in rows_seen


def test_dataset_validates_and_training_ran(demo_run):
    ws, summary = demo_run
    st = summary["stages"]
    assert st["validation"]["passed"] is True
    assert st["validation"]["valid_percent"] == 100.0
    assert st["augmentation"]["augmented_clusters"] >= 2  # both tier C clusters are augmented
    assert st["captions"]["failed"] == 0
    assert st["packaging"]["commands"] and all(
        c.startswith("accelerate launch train_network.py --config_file ") for c in st["packaging"]["commands"]
    )
    assert st["training"]["characters"] == 1 and st["training"]["failed"] == 0
    assert list((ws / "trained_models" / "char_000").glob("*.safetensors"))


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


def test_low_resolution_is_reported_and_stops_training(demo_run, sample_series):
    """Runs last: re-packages the demo workspace without upscaling, keeping the low-resolution layers."""
    from flows.pipeline import EpisodesFailed, pipeline_flow

    ws, _ = demo_run
    cfg = PipelineConfig.model_validate(json.loads((ws / "config.json").read_text()))
    cfg.packaging.upscale_to = 0  # the sample layers are 50-130 px: all below the 512 px minimum
    cfg.packaging.low_resolution = "keep"
    state = pipeline_flow(str(sample_series / "episodes"), str(ws), cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(EpisodesFailed) as err:
        state.result()
    report = ws / "logs" / "validation_report.json"
    assert f"training not started: the training data failed validation. Report: {report}" in str(err.value)
    summary = json.loads((ws / "summary.json").read_text())
    val = summary["stages"]["validation"]
    assert val["passed"] is False and val["resolution_too_low"] == val["total_images"] > 0
    assert "training" not in summary["stages"]
    assert json.loads(report.read_text())["issue_counts"]["Resolution too low"] == val["total_images"]
