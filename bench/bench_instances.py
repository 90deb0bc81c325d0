"""Instance quality per sample-series variant with the default offline backends (CPU, no weights).

Usage:
    python bench/bench_instances.py                          # every variant, 2 episodes x 24 s
    python bench/bench_instances.py --variants default hard --seconds 40 --episodes 3
    python bench/bench_instances.py --set detection.mask_cell_frac=0.02

For each variant of ``synthetic.VARIANTS`` a series is generated, then frames -> detection and
layering -> offline embedding -> clustering run through the library (the stages the demo runs,
without Prefect), and the figures issue 15 sets floors on are printed against the ground truth:

- ``seg_iou``: foreground IoU of the layered frames' masks;
- ``ari`` / ``purity``: clustering of the character layers against the true characters;
- ``unmatched``: share of character layers that no character covers half of;
- ``own``: share of visible characters (>= 1,500 px) with a layer of their own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOORS = {"ari": 0.9, "purity": 0.95, "unmatched": 0.10, "own": 0.80}


def _config(overrides: list[str]):
    from yokai_pipeline.config import PipelineConfig

    data = PipelineConfig().model_dump()
    for item in overrides:
        key, _, value = item.partition("=")
        section, field = key.split(".")
        data[section][field] = json.loads(value)
    return PipelineConfig.model_validate(data)


def run_variant(variant: str, root: Path, episodes: int, seconds: float, seed: int, cfg) -> dict:
    """Generate one variant, run the offline stages and return its figures."""
    from yokai_pipeline import clustering, embedding, frames, layering, summary, synthetic
    from yokai_pipeline.fsio import read_jsonl
    from yokai_pipeline.workspace import Workspace

    info = synthetic.generate_series(
        root / "series", seed=seed, episodes=episodes, seconds=seconds, variant=variant
    )
    ws = Workspace(root / "ws")
    t0 = time.perf_counter()
    ids, refs = [], []
    for video in info.episodes:
        stats = frames.extract_frames(video, ws, cfg.frames, reference_hashes=refs)
        ep = stats["episode_id"]
        ids.append(ep)
        refs += frames.read_frame_hashes(ws.frames_manifest(ep))
        rows = read_jsonl(ws.frames_manifest(ep))
        layering.write_layer_manifest(ws, ep, layering.segment_layers(rows, ws, cfg.layering, cfg.detection))
        embedding.embed_layers(ws, ep, cfg.embedding)
    clustering.cluster_layers(ws, ids, cfg.clustering)
    quality = summary.evaluate_quality(ws, ids, info.ground_truth_dir)
    inst, clus = quality.get("instances", {}), quality.get("clustering", {})
    return {
        "variant": variant,
        "seg_iou": quality.get("segmentation", {}).get("mean_iou"),
        "ari": clus.get("ari"),
        "purity": clus.get("purity"),
        "unmatched": inst.get("unmatched_share"),
        "own": inst.get("own_layer_share"),
        "layers": inst.get("character_layers"),
        "visible": inst.get("visible_characters"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def meets(fig: dict) -> bool:
    return all(
        fig[k] is not None and (fig[k] <= v if k == "unmatched" else fig[k] >= v) for k, v in FLOORS.items()
    )


def main() -> None:
    from yokai_pipeline import synthetic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(synthetic.VARIANTS))
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. detection.diff_tol=20")
    ap.add_argument("--keep", type=Path, default=None, help="keep the workspaces under this folder")
    args = ap.parse_args()
    cfg = _config(args.set)
    print("variant        seg_iou  ari     purity  unmatched  own     layers  visible  floors  s")
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp:
        base = args.keep or Path(tmp)
        for v in args.variants:
            f = run_variant(v, base / v, args.episodes, args.seconds, args.seed, cfg)
            print(
                f"{v:<14} {f['seg_iou']!s:<8} {f['ari']!s:<7} {f['purity']!s:<7} {f['unmatched']!s:<10} "
                f"{f['own']!s:<7} {f['layers']!s:<7} {f['visible']!s:<8} {'met' if meets(f) else 'NOT':<7} {f['seconds']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
