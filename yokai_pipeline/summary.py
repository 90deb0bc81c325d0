"""The run summary (summary.json): per stage counts and seconds, plus quality figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yokai_pipeline.fsio import atomic_write_json
from yokai_pipeline.workspace import Workspace


def build_summary(
    episodes: list[dict], failed: list[dict], quality: dict, seconds: float, stages: dict | None = None
) -> dict[str, Any]:
    """Aggregate per-episode results (from the episode flow) and later stages into one summary."""
    fr = [e["frames"] for e in episodes]
    ly = [e["layers"] for e in episodes]
    out: dict[str, Any] = {
        "episodes": {
            "total": len(episodes) + len(failed),
            "completed": [e["episode"] for e in episodes],
            "failed": failed,
        },
        "stages": {
            "frames": {
                "decoded": sum(f.get("decoded", 0) for f in fr),
                "shots": sum(f.get("shots", 0) for f in fr),
                "kept": sum(f.get("kept", 0) for f in fr),
                "dropped_within": sum(f.get("dropped_within", 0) for f in fr),
                "dropped_cross": sum(f.get("dropped_cross", 0) for f in fr),
                "seconds": round(sum(f.get("flow_seconds", f.get("seconds", 0.0)) for f in fr), 3),
            },
            "layers": {
                "character": sum(x["character_layers"] for x in ly),
                "background": sum(x["background_layers"] for x in ly),
                "seconds": round(sum(x.get("seconds", 0.0) for x in ly), 3),
            },
        },
        "quality": quality,
        "per_episode": episodes,
        "seconds": seconds,
    }
    out["stages"].update(stages or {})
    return out


def write_summary(ws: Workspace, summary: dict) -> Path:
    return atomic_write_json(ws.summary_file, summary)


def evaluate_quality(ws: Workspace, episode_ids: list[str], ground_truth_dir: Path) -> dict[str, Any]:
    """Quality figures of the stages so far against the sample series' ground truth."""
    from yokai_pipeline import layering, synthetic

    ious = {}
    for ep in episode_ids:
        gt_path = ground_truth_dir / f"{ep}.json"
        if gt_path.exists():
            ious[ep] = layering.mask_iou(ws, ep, synthetic.load_ground_truth(gt_path))
    quality: dict[str, Any] = {}
    if ious:
        means = [v["mean_iou"] for v in ious.values() if v.get("mean_iou") is not None]
        quality["segmentation"] = {
            "mean_iou": round(sum(means) / len(means), 4),
            "per_episode": ious,
        }
    inst = instance_quality(ws, episode_ids, ground_truth_dir)
    if inst:
        quality["instances"] = inst
    quality.update(_identity_quality(ws, ground_truth_dir))
    return quality


#: A character counts as visible in a frame from this many visible pixels (issue 15's floor).
VISIBLE_PX = 1500


def instance_quality(ws: Workspace, episode_ids: list[str], ground_truth_dir: Path) -> dict[str, Any]:
    """How well the character layers are one character each, against the ground truth.

    A layer *belongs* to the character that covers most of its alpha, if that is half of it
    or more; a layer no character covers half of (a prop, a merge of two) matches none. A
    visible character (>= :data:`VISIBLE_PX` visible pixels in a layered frame) *has a layer of
    its own* when a layer belongs to it and covers half of its visible pixels or more.

    Returns:
        ``{"character_layers", "unmatched_share", "visible_characters", "own_layer_share"}``,
        or {} when no episode has both ground truth and a layer manifest.
    """
    import cv2
    import numpy as np

    from yokai_pipeline import synthetic
    from yokai_pipeline.fsio import read_jsonl

    layers = unmatched = visible = own = 0
    for ep in episode_ids:
        gt_path, manifest = ground_truth_dir / f"{ep}.json", ws.layers_manifest(ep)
        if not (gt_path.exists() and manifest.is_file()):
            continue
        gt = synthetic.load_ground_truth(gt_path)
        by_frame: dict[int, list[dict]] = {}
        for row in read_jsonl(manifest):
            by_frame.setdefault(int(row["frame_index"]), []).append(row)
        for fi, rows in by_frame.items():
            truth = synthetic.gt_mask(gt, fi)
            owned: dict[int, int] = {}
            for row in rows:
                if row["kind"] != "character":
                    continue
                layers += 1
                alpha = cv2.imread(str(ws.abs(row["path"])), cv2.IMREAD_UNCHANGED)
                x0, y0, x1, y1 = row["box"]
                if alpha is None or alpha.ndim != 3 or alpha.shape[2] != 4:
                    unmatched += 1
                    continue
                t = truth[y0:y1, x0:x1][alpha[..., 3] > 0]
                ids, counts = np.unique(t, return_counts=True)
                best = int(np.argmax(counts)) if counts.size else 0
                if not counts.size or ids[best] == 0 or counts[best] * 2 < t.size:
                    unmatched += 1
                    continue
                owned[int(ids[best])] = max(owned.get(int(ids[best]), 0), int(counts[best]))
            ids, areas = np.unique(truth[truth > 0], return_counts=True)
            for cid, area in zip(ids.tolist(), areas.tolist(), strict=True):
                if area >= VISIBLE_PX:
                    visible += 1
                    own += owned.get(cid, 0) * 2 >= area
    if not layers and not visible:
        return {}
    return {
        "character_layers": layers,
        "unmatched_share": round(unmatched / max(1, layers), 4),
        "visible_characters": visible,
        "own_layer_share": round(own / max(1, visible), 4),
    }


def _identity_quality(ws: Workspace, ground_truth_dir: Path) -> dict[str, Any]:
    """Clustering ARI/purity and character-type accuracy against the ground-truth characters."""
    from collections import Counter

    from yokai_pipeline import analysis, clustering, synthetic

    doc = clustering.read_clusters(ws)
    if doc is None:
        return {}
    labels = synthetic.ground_truth_labels(doc["members"], ground_truth_dir)
    out: dict[str, Any] = {"clustering": clustering.evaluate_clusters(doc["members"], labels)}
    types = {c.id: c.type for c in synthetic.CHARACTERS}
    votes: dict[int, Counter] = {}
    for m in doc["members"]:
        truth = labels.get(m["layer_id"])
        if m["cluster"] >= 0 and truth is not None:
            votes.setdefault(m["cluster"], Counter())[truth] += 1
    truth_type = {cid: types[c.most_common(1)[0][0]] for cid, c in votes.items()}
    ana_path = ws.analysis_dir / "cluster_analysis.json"
    if ana_path.exists() and truth_type:
        result = analysis.read_analysis(ana_path)
        out["character_type"] = {
            "accuracy": round(analysis.type_accuracy(result, truth_type), 4),
            "clusters": len(truth_type),
        }
        # which ground-truth character each cluster is, so tiers can be checked against appearances
        out["clusters_to_characters"] = {str(cid): c.most_common(1)[0][0] for cid, c in votes.items()}
    return out


def summary_markdown(summary: dict) -> str:
    """Markdown version of the summary for a Prefect artifact."""
    lines = ["# Yokai pipeline run", "", "| stage | figures |", "|---|---|"]
    for stage, figs in summary["stages"].items():
        text = ", ".join(f"{k}={v}" for k, v in figs.items() if not isinstance(v, dict | list))
        lines.append(f"| {stage} | {text} |")
    ep = summary["episodes"]
    lines += ["", f"Episodes: {len(ep['completed'])} completed, {len(ep['failed'])} failed of {ep['total']}."]
    for f in ep["failed"]:
        lines.append(f"- failed: `{f['episode']}`: {f['error']}")
    q = summary.get("quality") or {}
    if q:
        lines += ["", "## Quality against ground truth"]
        for k, v in q.items():
            figs = ", ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, dict | list))
            lines.append(f"- {k}: {figs}")
    return "\n".join(lines) + "\n"
