"""Hostile and unusual input files, made in the test (no downloads, no ffmpeg binary).

Videos are written with OpenCV (mp4v) or, where a container feature is needed that OpenCV
cannot write (audio-only, variable frame rate), with PyAV (``pip install av``).
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- videos


def flat_frames(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` BGR frames: flat colour blocks with black outlines, two hard cuts."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        shot = i * 3 // max(1, n)
        img = np.full((height, width, 3), (40 + 70 * shot, 160, 220 - 60 * shot), np.uint8)
        x = int(width * (0.2 + 0.4 * (i % 10) / 10))
        y = height // 3
        r = max(2, min(width, height) // 6)
        cv2.circle(img, (x, y + r), r, tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        cv2.circle(img, (x, y + r), r, (0, 0, 0), max(1, r // 10))
        frames.append(img)
    return frames


def write_mp4(path: Path, frames: list[np.ndarray], fps: float = 24.0) -> Path:
    """Write BGR frames as MPEG-4 part 2 in mp4 with OpenCV."""
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def good_video(
    path: Path, seconds: float = 2.0, width: int = 320, height: int = 180, fps: float = 24.0
) -> Path:
    return write_mp4(path, flat_frames(int(seconds * fps), width, height), fps)


def zero_byte_video(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated_video(path: Path, keep: float = 0.4) -> Path:
    """A valid mp4 cut short: the moov atom at the end (OpenCV's writer) is lost, or frames are."""
    good = good_video(path.with_name("full_" + path.name), seconds=3.0)
    data = good.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    good.unlink()
    return path


def text_as_video(path: Path) -> Path:
    path.write_text("this is not a video\n" * 50, encoding="utf-8")
    return path


def one_frame_video(path: Path) -> Path:
    return write_mp4(path, flat_frames(1, 320, 180), 24.0)


def vertical_video(path: Path) -> Path:
    return write_mp4(path, flat_frames(36, 180, 320), 24.0)


def uhd_video(path: Path, n: int = 8) -> Path:
    """A short 3840x2160 clip (few frames: 4K decode is slow on 2 cores)."""
    return write_mp4(path, flat_frames(n, 3840, 2160), 24.0)


def audio_only_mp4(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 with one AAC audio stream and no video stream (PyAV)."""
    import av

    rate = 44100
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        chunk = 1024
        for i in range(0, len(samples) - chunk, chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, i : i + chunk], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def vfr_mp4(path: Path, n: int = 60) -> tuple[Path, list[float]]:
    """A variable-frame-rate mp4 (PyAV, explicit pts): gaps of 1, 2 and 5 ticks of 1/48 s.

    Returns the path and the presentation time of every frame in seconds.
    """
    import av

    frames = flat_frames(n, 320, 180)
    steps = [1, 2, 5]
    pts, times = 0, []
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=48)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 48)
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="bgr24")
            vf.pts = pts
            vf.time_base = Fraction(1, 48)
            times.append(pts / 48)
            for packet in stream.encode(vf):
                out.mux(packet)
            pts += steps[i % 3]
        for packet in stream.encode(None):
            out.mux(packet)
    return path, times


# ----------------------------------------------------------------------------- images


def character_rgba(size: int = 96, seed: int = 0) -> np.ndarray:
    """An RGBA character-like layer: outlined flat-colour body on transparency."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 4), np.uint8)
    colour = tuple(int(v) for v in rng.integers(40, 230, 3)) + (255,)
    cv2.ellipse(img, (size // 2, size // 2), (size // 3, size // 2 - 4), 0, 0, 360, colour, -1)
    cv2.ellipse(img, (size // 2, size // 2), (size // 3, size // 2 - 4), 0, 0, 360, (0, 0, 0, 255), 2)
    cv2.circle(img, (size // 2, size // 3), size // 8, (250, 250, 250, 255), -1)
    return img


def good_png(path: Path, size: int = 96, seed: int = 0, rgb: bool = False) -> Path:
    arr = character_rgba(size, seed)
    Image.fromarray(arr[..., :3] if rgb else arr, "RGB" if rgb else "RGBA").save(path)
    return path


def truncated_png(path: Path) -> Path:
    good = good_png(path.with_name("full_" + path.name), size=128, seed=7)
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def one_pixel_png(path: Path) -> Path:
    Image.new("RGBA", (1, 1), (200, 30, 30, 255)).save(path)
    return path


def png16_rgba(path: Path, size: int = 96) -> Path:
    """16-bit-per-channel RGBA PNG (OpenCV writes 16-bit; Pillow reads it as 8-bit RGBA)."""
    arr = character_rgba(size, 3).astype(np.uint16) * 257
    cv2.imwrite(str(path), cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA))
    return path


def png16_grey(path: Path, size: int = 96) -> Path:
    """16-bit greyscale PNG with a full-range gradient (Pillow mode ``I;16``)."""
    grad = np.tile(np.linspace(0, 65535, size, dtype=np.float64), (size, 1)).astype(np.uint16)
    cv2.imwrite(str(path), grad)
    return path


def cmyk_jpeg(path: Path, size: int = 96) -> Path:
    Image.fromarray(character_rgba(size, 4)[..., :3], "RGB").convert("CMYK").save(path, "JPEG", quality=95)
    return path


def palette_png(path: Path, size: int = 96) -> Path:
    """Palette PNG whose index 0 is transparent (tRNS), as GIF-era tools write."""
    rgba = character_rgba(size, 5)
    q = Image.fromarray(rgba[..., :3], "RGB").quantize(colors=15)
    idx = np.asarray(q).astype(np.uint8) + 1
    idx[rgba[..., 3] == 0] = 0
    pal = [0, 255, 0] + q.getpalette()[: 15 * 3]
    p = Image.frombytes("P", (size, size), idx.tobytes())
    p.putpalette(pal)
    p.save(path, transparency=0)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (far over Pillow's MAX_IMAGE_PIXELS)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


#: name -> (maker, handled): ``handled`` images must be processed like a normal image, the others
#: must be rejected with an error naming the file.
BAD_IMAGES = {
    "truncated.png": (truncated_png, False),
    "one_pixel.png": (one_pixel_png, True),
    "png16_rgba.png": (png16_rgba, True),
    "png16_grey.png": (png16_grey, True),
    "cmyk.jpg": (cmyk_jpeg, True),
    "palette_trns.png": (palette_png, True),
    "bomb.png": (bomb_png, False),
}


def make_bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {name: maker(folder / name) for name, (maker, _) in BAD_IMAGES.items()}
