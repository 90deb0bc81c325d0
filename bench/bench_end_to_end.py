"""End-to-end throughput: one long episode through frames -> layers -> embeddings.

Builds an H.264 episode of ``--minutes`` at ``--size`` from differently seeded sample series
(bench/videos.py; the content does not repeat, so near-duplicate removal keeps what a real
episode of that shot rate would keep), then times each stage with the library functions
directly, the way one long-lived GPU worker runs an episode (not through Prefect: the GPU host
has no Prefect). Model loading is timed separately (a worker loads once and keeps the models).
``--decoder`` picks the frame decoder (auto = NVDEC where a GPU and PyNvVideoCodec are present);
with NVDEC the bare NVDEC decode of the same file over the same segments is timed too, and the
ratio of the frames stage to it printed. ``--compare-pyav`` also extracts with PyAV and prints
how many kept frames the two decoders share. Prints a table; with --json writes the figures.

    python bench/bench_end_to_end.py --minutes 22 --size 1920x1080 --layering u2net --embedding clip
    python bench/bench_end_to_end.py --minutes 22 --size 1920x1080 --decoder nvdec --compare-pyav
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
    ap.add_argument("--decoder", default="auto", choices=["auto", "nvdec", "pyav"])
    ap.add_argument("--segments", type=int, default=0, help="decode segments (0 = the decoder's default)")
    ap.add_argument("--compare-pyav", action="store_true", help="also extract with PyAV; print the agreement")
    ap.add_argument("--skip-pyav-bare", action="store_true", help="don't time PyAV's bare decode")
    ap.add_argument("--frames-only", action="store_true", help="stop after the frames stage")
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
    n_frames, t_bare = (0, float("nan")) if args.skip_pyav_bare else bare_decode_av(video)
    fcfg = FramesConfig(decoder=args.decoder, decode_segments=args.segments)
    nvdec_bare = _nvdec_bare(video, fcfg)
    if args.frames_only:
        _frames_only(args, work, video, fcfg, n_frames, t_bare, nvdec_bare)
        return

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
    stats = frames.extract_frames(video, ws, fcfg)
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
        "video": f"{args.minutes:g} min {width}x{height} H.264 @24fps, {stats['decoded']} frames",
        "bare_decode_s": round(t_bare, 2),
        "decoder": f"{stats.get('decoder')} x{stats.get('decode_segments')}",
        **_ratio(t_frames, nvdec_bare),
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
        "nvdec_bare_s",
        "model_load_s",
        "frames_s",
        "layers_s",
        "embed_s",
        "total_s",
        "total_with_load_s",
    ):
        print(f"{key:<22}{result.get(key, '-'):>10}")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _nvdec_bare(video: Path, fcfg: FramesConfig) -> tuple[int, float] | None:
    """(frames, seconds) of NVDEC's bare decode over the frames stage's segments, when NVDEC is used."""
    if frames.resolve_decoder(fcfg.decoder) != "nvdec":
        return None
    from yokai_pipeline.video import nvdec

    nvdec.bare_decode(video, fcfg.decode_segments)  # warm-up: CUDA context, decoder sessions
    return nvdec.bare_decode(video, fcfg.decode_segments)


def _ratio(t_frames: float, nvdec_bare: tuple[int, float] | None) -> dict:
    if nvdec_bare is None:
        return {}
    n, t = nvdec_bare
    return {
        "nvdec_bare_s": round(t, 2),
        "nvdec_bare_fps": round(n / t, 1),
        "frames_over_nvdec_bare": round(t_frames / t, 3),
    }


def _kept(ws: Workspace, episode_id: str) -> list[int]:
    return [int(r["frame_index"]) for r in read_jsonl(ws.frames_manifest(episode_id))]


def _frames_only(args, work: Path, video: Path, fcfg: FramesConfig, n_frames, t_bare, nvdec_bare) -> None:
    """The frames stage alone (after the bare decode, which warmed CUDA and NVDEC), optionally vs PyAV."""
    episode_id = frames.episode_id_for(video)
    ws = Workspace(work / f"ws_{time.time_ns()}")
    t0 = time.perf_counter()
    stats = frames.extract_frames(video, ws, fcfg)
    t_frames = time.perf_counter() - t0
    result = {
        "video": f"{args.minutes:g} min H.264, {stats['decoded']} frames",
        "decoder": f"{stats.get('decoder')} x{stats.get('decode_segments')}",
        "pyav_bare_s": round(t_bare, 2),
        "frames_s": round(t_frames, 2),
        "frames_fps": round(stats["decoded"] / t_frames, 1),
        "kept": stats["kept"],
        "shots": stats["shots"],
        **_ratio(t_frames, nvdec_bare),
    }
    if args.compare_pyav:
        ws_cpu = Workspace(work / f"ws_pyav_{time.time_ns()}")
        t0 = time.perf_counter()
        cpu = frames.extract_frames(video, ws_cpu, fcfg.model_copy(update={"decoder": "pyav"}))
        a, b = set(_kept(ws, episode_id)), set(_kept(ws_cpu, episode_id))
        result.update(
            pyav_frames_s=round(time.perf_counter() - t0, 2),
            pyav_kept=cpu["kept"],
            pyav_shots=cpu["shots"],
            same_shot_starts=cpu["shot_starts"] == stats["shot_starts"],
            kept_in_both=len(a & b),
            kept_only_nvdec=len(a - b),
            kept_only_pyav=len(b - a),
        )
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
