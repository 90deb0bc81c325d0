"""kohya's aspect-ratio buckets (library/model_util.py make_bucket_resolutions, BucketManager)."""

from __future__ import annotations

import math


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """kohya's bucket list: every (w, h) on the step grid with area <= max area."""
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)  # type: ignore[arg-type]


def select_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Bucket with the nearest aspect ratio and the size the image is resized to before its centre crop."""
    w, h = size
    ar = w / h
    if (w, h) in buckets:
        reso = (w, h)
    else:
        reso = min(buckets, key=lambda r: abs(r[0] / r[1] - ar))
    scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
    return reso, (int(w * scale + 0.5), int(h * scale + 0.5))
