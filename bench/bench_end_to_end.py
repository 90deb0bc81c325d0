"""End-to-end throughput: one long episode through frames -> layers -> embeddings.

Builds an episode of ``--minutes`` at ``--size`` by upscaling and looping the sample series
(content repeats, so near-duplicate removal keeps fewer frames than a real episode would;
decode, shot detection and hashing still see every frame), then times each stage with the
library functions directly. Prints a table; with --json writes the figures.

    python bench/bench_end_to_end.py --minutes 22 --size 1920x1080 --layering u2net --embedding clip
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2

from yokai_pipeline import embedding, frames, layering, synthetic
from yokai_pipeline.config import EmbeddingConfig, FramesConfig, LayeringConfig
from yokai_pipeline.fsio import read_jsonl
from yokai_pipeline.workspace import Workspace


def make_episode(dest: Path, minutes: float, width: int, height: int, fps: int = 24) -> int:
    """Loop the sample series' episodes, upscaled, into one mp4 of ``minutes``."""
    series = synthetic.generate_series(dest.parent / "series", seed=0, episodes=3, seconds=40.0)
    sources = sorted(Path(series.episodes_dir).glob("*.mp4"))
    total = int(minutes * 60 * fps)
    writer = cv2.VideoWriter(str(dest), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    n = 0
    while n < total:
        for src in sources:
            cap = cv2.VideoCapture(str(src))
            while n < total:
                ok, frame = cap.read()
                if not ok:
                    break
                writer.write(cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR))
                n += 1
            cap.release()
    writer.release()
    return n


def bare_decode(path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        cap.retrieve()
        n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=22.0)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--layering", default="offline", choices=["offline", "u2net", "u2netp"])
    ap.add_argument("--embedding", default="offline", choices=["offline", "clip"])
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="yokai-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    video = work / "episode.mp4"
    t0 = time.perf_counter()
    n_frames = make_episode(video, args.minutes, width, height)
    t_make = time.perf_counter() - t0
    _, t_bare = bare_decode(video)

    ws = Workspace(work / "ws")
    episode_id = frames.episode_id_for(video)
    t0 = time.perf_counter()
    stats = frames.extract_frames(video, ws, FramesConfig())
    t_frames = time.perf_counter() - t0

    lcfg = LayeringConfig(backend=args.layering, batch_size=args.batch_size, compile=args.compile)
    if args.layering != "offline":
        from yokai_pipeline.models import u2net

        weights = work / f"{args.layering}.safetensors"
        u2net.save_u2net_safetensors(u2net.build_u2net(args.layering), weights)
        lcfg = lcfg.model_copy(update={"weights": weights})
    rows = read_jsonl(ws.frames_manifest(episode_id))
    t0 = time.perf_counter()
    layer_rows = layering.segment_layers(rows, ws, lcfg)
    layering.write_layer_manifest(ws, episode_id, layer_rows)
    t_layers = time.perf_counter() - t0

    ecfg = EmbeddingConfig(backend=args.embedding, model=args.clip_model, pretrained=None, batch_size=256)
    t0 = time.perf_counter()
    emb = embedding.embed_layers(ws, episode_id, ecfg)
    t_embed = time.perf_counter() - t0

    total = t_frames + t_layers + t_embed
    result = {
        "video": f"{args.minutes} min {width}x{height} @24fps, {n_frames} frames (generated in {t_make:.1f} s)",
        "bare_decode_s": round(t_bare, 2),
        "frames_s": round(t_frames, 2),
        "frames_kept": stats.get("kept"),
        "layers_s": round(t_layers, 2),
        "character_layers": sum(r["kind"] == "character" for r in layer_rows),
        "embed_s": round(t_embed, 2),
        "embeddings": emb.get("n"),
        "total_s": round(total, 2),
        "layering": args.layering,
        "embedding": args.embedding,
    }
    print(f"{'stage':<22}{'seconds':>10}")
    for key in ("bare_decode_s", "frames_s", "layers_s", "embed_s", "total_s"):
        print(f"{key:<22}{result[key]:>10}")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
