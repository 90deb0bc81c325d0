"""End-to-end throughput: one long episode through frames -> layers -> embeddings.

Builds an H.264 episode of ``--minutes`` at ``--size`` from differently seeded sample series
(bench/videos.py; the content does not repeat, so near-duplicate removal keeps what a real
episode of that shot rate would keep), then times each stage with the library functions
directly, the way one long-lived GPU worker runs an episode. Model loading is timed separately
(a worker loads once and keeps the models); ``--cold`` adds it to the stage times instead.
Prints a table; with --json writes the figures.

    python bench/bench_end_to_end.py --minutes 22 --size 1920x1080 --layering u2net --embedding clip
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_frames import bare_decode_av  # noqa: E402
from bench.videos import long_episode  # noqa: E402
from yokai_pipeline import embedding, frames, layering  # noqa: E402
from yokai_pipeline.config import EmbeddingConfig, FramesConfig, LayeringConfig  # noqa: E402
from yokai_pipeline.fsio import read_jsonl  # noqa: E402
from yokai_pipeline.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=22.0)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--layering", default="offline", choices=["offline", "u2net", "u2netp"])
    ap.add_argument("--embedding", default="offline", choices=["offline", "clip"])
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    cores = os.cpu_count() or 2
    ap.add_argument("--layer-workers", type=int, default=cores, help="layering worker processes")
    ap.add_argument("--embed-workers", type=int, default=max(1, cores - 2), help="embedding decode workers")
    ap.add_argument(
        "--workers", type=int, default=4, help="processes rendering and encoding the source series"
    )
    ap.add_argument("--distinct", type=int, default=4, help="distinct 2-minute series in the episode")
    ap.add_argument("--workdir", type=Path, default=None, help="reuses an episode generated there before")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="yokai-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    video = long_episode(
        work / f"episode_{args.minutes:g}min_{width}x{height}.mp4",
        args.minutes,
        width,
        height,
        distinct=args.distinct,
        workers=args.workers,
    )
    n_frames, t_bare = bare_decode_av(video)

    lcfg = LayeringConfig(
        backend=args.layering,
        batch_size=args.batch_size,
        compile=args.compile,
        num_workers=args.layer_workers,
    )
    if args.layering != "offline":
        from yokai_pipeline.models import u2net

        weights = work / f"{args.layering}.safetensors"
        u2net.save_u2net_safetensors(u2net.build_u2net(args.layering), weights)
        lcfg = lcfg.model_copy(update={"weights": weights})
    ecfg = EmbeddingConfig(
        backend=args.embedding,
        model=args.clip_model,
        pretrained=None,
        batch_size=256,
        num_workers=args.embed_workers,
    )
    t0 = time.perf_counter()
    layering.get_segmenter(lcfg)
    embedding.get_embedder(ecfg)
    t_load = time.perf_counter() - t0

    ws = Workspace(work / f"ws_{time.time_ns()}")
    episode_id = frames.episode_id_for(video)
    t0 = time.perf_counter()
    stats = frames.extract_frames(video, ws, FramesConfig())
    t_frames = time.perf_counter() - t0

    rows = read_jsonl(ws.frames_manifest(episode_id))
    t0 = time.perf_counter()
    layer_rows = layering.segment_layers(rows, ws, lcfg)
    layering.write_layer_manifest(ws, episode_id, layer_rows)
    t_layers = time.perf_counter() - t0

    t0 = time.perf_counter()
    emb = embedding.embed_layers(ws, episode_id, ecfg)
    t_embed = time.perf_counter() - t0

    total = t_frames + t_layers + t_embed
    result = {
        "video": f"{args.minutes:g} min {width}x{height} H.264 @24fps, {n_frames} frames",
        "bare_decode_s": round(t_bare, 2),
        "model_load_s": round(t_load, 2),
        "frames_s": round(t_frames, 2),
        "frames_kept": stats.get("kept"),
        "shots": stats.get("shots"),
        "layers_s": round(t_layers, 2),
        "character_layers": sum(r["kind"] == "character" for r in layer_rows),
        "embed_s": round(t_embed, 2),
        "embeddings": emb.get("n"),
        "total_s": round(total, 2),
        "total_with_load_s": round(total + t_load, 2),
        "layering": f"{args.layering} batch {args.batch_size}{' compiled' if args.compile else ''}",
        "embedding": args.embedding + (f" {args.clip_model}" if args.embedding == "clip" else ""),
    }
    print(f"{'stage':<22}{'seconds':>10}")
    for key in (
        "bare_decode_s",
        "model_load_s",
        "frames_s",
        "layers_s",
        "embed_s",
        "total_s",
        "total_with_load_s",
    ):
        print(f"{key:<22}{result[key]:>10}")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
