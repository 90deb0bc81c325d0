"""Keyframe segments: contiguous parts of an episode that separate decoders decode at once.

A segment starts at a keyframe, so its decoder needs no frame before it, and the segments
together cover every frame once, in order. Reading their frames one segment after the other
gives exactly the frame sequence of one pass over the whole file, so everything computed from
that sequence (shots, picks, hashes) is the same as with one decoder.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Frames ``start`` (a keyframe) up to ``end`` (exclusive), in presentation order."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def plan_segments(
    num_frames: int, keyframes: Sequence[int], parts: int, min_frames: int = 48
) -> list[Segment]:
    """Cut ``num_frames`` frames into at most ``parts`` segments starting at keyframes, near-equal in length.

    Args:
        num_frames: frames in the stream.
        keyframes: indices (presentation order) of the frames a decoder can start at; frame 0 is
            always a start even if it is missing here.
        parts: segments wanted (one per decoder).
        min_frames: a segment is not made shorter than this (a decoder's start-up is not free).

    Returns:
        Contiguous segments covering ``[0, num_frames)``; fewer than ``parts`` when the keyframes
        are too sparse or the stream is short.
    """
    if num_frames <= 0:
        return []
    starts = sorted({k for k in keyframes if 0 < k < num_frames})
    parts = max(1, min(parts, num_frames // max(1, min_frames)))
    cuts = [0]
    for j in range(1, parts):
        want = j * num_frames / parts
        i = bisect.bisect_left(starts, want)
        # the keyframe nearest the ideal cut, never before the previous cut
        options = [starts[k] for k in (i - 1, i) if 0 <= k < len(starts) and starts[k] > cuts[-1]]
        if not options:
            continue
        best = min(options, key=lambda k: abs(k - want))
        if best - cuts[-1] >= min_frames and num_frames - best >= min_frames:
            cuts.append(best)
    cuts.append(num_frames)
    return [Segment(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
