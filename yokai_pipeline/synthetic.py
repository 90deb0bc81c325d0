"""The built-in sample series: flat-colour anime episodes with exact ground truth.

It is the demo's default input and the tests' fixture. Everything is deterministic from a
seed: the same call writes byte-identical ground truth and (with the same OpenCV build) the
same video files.

Drawing style follows real anime: characters have black outlines and flat fills, with
black inner details (eyes); backgrounds are painted without lines and contain no
near-black pixels (every background pixel has a channel above 60), so a line-art based
segmenter has the same cues it has on a real episode.

Layout of ``generate_series(out_dir)``::

    out_dir/episodes/ep01.mp4 ...
    out_dir/ground_truth/ep01.json ...
    out_dir/characters.json
    out_dir/series.json          parameters the outputs were generated with (idempotence)

Ground truth per episode::

    {"episode": "ep01.mp4", "fps": 24, "width": 640, "height": 360, "n_frames": 960,
     "shots": [{"shot_id": 0, "start": 0, "end": 48}, ...],   # end exclusive
     "opening": [0, 96],
     "frames": [{"frame_index": 0, "shot_id": 0,
                 "characters": [{"id": 3, "box": [x0, y0, x1, y1], "polygon": [[x, y], ...]}]}]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from yokai_pipeline import fsio
from yokai_pipeline.errors import BadInputError

GENERATOR_VERSION = 1
OUTLINE = (0, 0, 0)
MARGIN = 4  # px between a character box and the frame edge
GAP = 8  # px between two character boxes
OPENING_SECONDS = 4.0


@dataclass(frozen=True)
class CharacterSpec:
    """One recurring character of the sample series.

    Attributes:
        id: Stable id (index in :data:`CHARACTERS`); ground-truth labels use it.
        name: Display name, also a plausible trigger word.
        type: "human" or "yokai".
        symmetric: True when the design is mirror-symmetric (horizontal flips are safe).
        colours: Named RGB fill colours of the design.
        share: Fraction of episode shots the character appears in (the appearance schedule).
    """

    id: int
    name: str
    type: Literal["human", "yokai"]
    symmetric: bool
    colours: dict[str, tuple[int, int, int]]
    share: float = 0.1
    in_opening: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["colours"] = {k: list(v) for k, v in self.colours.items()}
        return d


SKIN = (250, 214, 180)

# Shares are tuned so that, after frame extraction with the default FramesConfig (about 3
# kept frames per shot, the opening kept once), the default series spans every tier of the
# guide with a human and a yokai in each: S 100+, A 50-100, B 20-50, C 15-20, D < 15.
CHARACTERS: list[CharacterSpec] = [
    CharacterSpec(
        0,
        "keita",
        "human",
        False,
        {
            "skin": SKIN,
            "hair": (120, 72, 40),
            "shirt": (214, 48, 52),
            "pants": (52, 84, 170),
            "shoes": (235, 235, 235),
            "stripe": (250, 250, 250),
        },
        share=0.59,
        in_opening=True,
    ),
    CharacterSpec(
        1,
        "whisp",
        "yokai",
        True,
        {"body": (238, 242, 252), "lips": (150, 90, 200), "cheek": (255, 170, 190)},
        share=0.54,
        in_opening=True,
    ),
    CharacterSpec(
        2,
        "fumi",
        "human",
        True,
        {
            "skin": SKIN,
            "hair": (236, 110, 160),
            "dress": (250, 208, 60),
            "legs": SKIN,
            "shoes": (200, 60, 80),
            "ribbon": (90, 190, 230),
        },
        share=0.365,
        in_opening=True,
    ),
    CharacterSpec(
        3,
        "nyan",
        "yokai",
        True,
        {
            "body": (226, 46, 40),
            "muzzle": (255, 246, 236),
            "band": (252, 206, 40),
            "ear": (255, 170, 170),
            "tail_tip": (255, 120, 60),
        },
        share=0.31,
        in_opening=True,
    ),
    CharacterSpec(
        4,
        "kuma",
        "human",
        False,
        {
            "skin": (232, 188, 150),
            "hair": (246, 150, 40),
            "shirt": (60, 160, 80),
            "pants": (130, 130, 140),
            "shoes": (120, 80, 50),
            "badge": (250, 230, 90),
        },
        share=0.19,
    ),
    CharacterSpec(
        5,
        "medama",
        "yokai",
        True,
        {
            "body": (150, 80, 200),
            "eye": (255, 255, 255),
            "horn": (250, 200, 90),
            "feet": (110, 60, 160),
            "iris": (60, 170, 90),
        },
        share=0.16,
    ),
    CharacterSpec(
        6,
        "kappa",
        "yokai",
        True,
        {
            "body": (96, 196, 90),
            "plate": (230, 245, 250),
            "beak": (250, 196, 40),
            "shell": (150, 100, 60),
            "belly": (220, 240, 170),
        },
        share=0.093,
    ),
    CharacterSpec(
        7,
        "hana",
        "human",
        False,
        {
            "skin": SKIN,
            "hair": (110, 190, 240),
            "jacket": (250, 140, 40),
            "skirt": (90, 90, 170),
            "legs": SKIN,
            "shoes": (70, 70, 110),
            "clip": (250, 90, 150),
        },
        share=0.093,
    ),
    CharacterSpec(
        8,
        "sakana",
        "yokai",
        False,
        {
            "body": (60, 130, 230),
            "belly": (200, 230, 255),
            "fin": (40, 200, 220),
            "legs": (250, 170, 60),
            "patch": (250, 230, 80),
        },
        share=0.048,
    ),
    CharacterSpec(
        9,
        "obaa",
        "human",
        True,
        {
            "skin": (240, 204, 172),
            "hair": (205, 205, 215),
            "kimono": (130, 70, 150),
            "obi": (240, 210, 100),
            "shoes": (150, 110, 80),
        },
        share=0.048,
    ),
]

CHARACTER_BY_ID = {c.id: c for c in CHARACTERS}


@dataclass(frozen=True)
class Variant:
    """A harder sample series: which difficulties are switched on (all off = the default series).

    Attributes:
        name: Variant name (recorded in ``series.json`` unless "default").
        props: Background buildings and props drawn with black outlines, like line art.
        overlap: Characters of a shot overlap and walk past each other.
        night: Night palette: the whole frame darkened and tinted blue (backgrounds near black).
        edge: Characters walk across the left or right frame edge.
        shared_colour: Two characters share a body colour (medama takes nyan's red).
        shared_shape: Two characters share a shape (kappa is drawn as a second cat, in its colours).
    """

    name: str = "default"
    props: bool = False
    overlap: bool = False
    night: bool = False
    edge: bool = False
    shared_colour: bool = False
    shared_shape: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(),
        Variant("props", props=True),
        Variant("overlap", overlap=True),
        Variant("night", night=True),
        Variant("edge", edge=True),
        Variant("shared_colour", shared_colour=True),
        Variant("shared_shape", shared_shape=True),
        Variant("hard", True, True, True, True, True, True),
    )
}

#: Multiplier of the night palette (outlines stay black; a background pixel of 64 falls to 27-50).
NIGHT_TINT = np.array([0.42, 0.48, 0.78], np.float32)


def variant_characters(variant: Variant) -> list[CharacterSpec]:
    """The character table of a variant (the default table unless colours or shapes are shared)."""
    out = list(CHARACTERS)
    if variant.shared_colour:
        c = dict(out[5].colours, body=out[3].colours["body"])
        out[5] = CharacterSpec(5, "medama", "yokai", True, c, share=out[5].share)
    if variant.shared_shape:
        c = {
            "body": out[6].colours["body"],
            "muzzle": out[6].colours["belly"],
            "band": out[6].colours["beak"],
            "ear": out[6].colours["plate"],
            "tail_tip": out[6].colours["shell"],
        }
        out[6] = CharacterSpec(6, "kappa", "yokai", True, c, share=out[6].share)
    return out


# --------------------------------------------------------------------------------------
# Character drawing


class _Pen:
    """Draws parts in character units onto a local RGB canvas and a mask.

    Units: a human is about 125 units tall; ``u`` px per unit. Origin = feet centre,
    y grows downwards (negative is up). A character facing left is drawn facing right and
    the canvas flipped at the end (exact mirror); fixed marks (``fixed=True``) are drawn
    pre-mirrored so they stay on the same image side, which makes a mirrored image of an
    asymmetric character differ from the character turned around.
    """

    def __init__(self, u: float, facing: int):
        self.u = u
        self.flip = facing < 0
        self.w = int(math.ceil(200 * u)) + 8
        self.h = int(math.ceil(175 * u)) + 8
        self.ox = self.w / 2
        self.oy = 160 * u + 4
        self.rgb = np.zeros((self.h, self.w, 3), np.uint8)
        self.mask = np.zeros((self.h, self.w), np.uint8)
        self.t = 2 if u < 1.15 else 3

    def p(self, x: float, y: float, fixed: bool = False) -> tuple[int, int]:
        fx = -x if (fixed and self.flip) else x
        return int(round(self.ox + fx * self.u)), int(round(self.oy + y * self.u))

    def _s(self, v: float) -> int:
        return max(1, int(round(v * self.u)))

    def ellipse(self, c, axes, fill, angle=0.0, arc=(0, 360), fixed=False, outline=True) -> None:
        ctr = self.p(*c, fixed=fixed)
        ax = (self._s(axes[0]), self._s(axes[1]))
        ang = -angle if (fixed and self.flip) else angle
        a0, a1 = arc
        if fixed and self.flip and (a0, a1) != (0, 360):
            a0, a1 = 180 - a1, 180 - a0
        cv2.ellipse(self.rgb, ctr, ax, ang, a0, a1, fill, -1)
        cv2.ellipse(self.mask, ctr, ax, ang, a0, a1, 255, -1)
        if outline:
            if (a0, a1) == (0, 360):
                cv2.ellipse(self.rgb, ctr, ax, ang, a0, a1, OUTLINE, self.t)
                cv2.ellipse(self.mask, ctr, ax, ang, a0, a1, 255, self.t)
            else:
                pts = cv2.ellipse2Poly(ctr, ax, int(round(ang)), int(a0), int(a1), 5)
                cv2.polylines(self.rgb, [pts], True, OUTLINE, self.t)
                cv2.polylines(self.mask, [pts], True, 255, self.t)

    def poly(self, pts: Sequence[tuple[float, float]], fill, fixed=False, outline=True) -> None:
        arr = np.array([self.p(x, y, fixed=fixed) for x, y in pts], np.int32)
        cv2.fillPoly(self.rgb, [arr], fill)
        cv2.fillPoly(self.mask, [arr], 255)
        if outline:
            cv2.polylines(self.rgb, [arr], True, OUTLINE, self.t)
            cv2.polylines(self.mask, [arr], True, 255, self.t)

    def limb(self, a, b, width: float, fill, fixed=False) -> None:
        pa, pb = self.p(*a, fixed=fixed), self.p(*b, fixed=fixed)
        wi = self._s(width)
        cv2.line(self.rgb, pa, pb, OUTLINE, wi + 2 * self.t)
        cv2.line(self.mask, pa, pb, 255, wi + 2 * self.t)
        cv2.line(self.rgb, pa, pb, fill, wi)

    def curve(self, pts: Sequence[tuple[float, float]], width: float, fill, fixed=False) -> None:
        arr = np.array([self.p(x, y, fixed=fixed) for x, y in pts], np.int32)
        wi = self._s(width)
        cv2.polylines(self.rgb, [arr], False, OUTLINE, wi + 2 * self.t)
        cv2.polylines(self.mask, [arr], False, 255, wi + 2 * self.t)
        cv2.polylines(self.rgb, [arr], False, fill, wi)

    def dot(self, c, r: float, colour=OUTLINE, fixed=False) -> None:
        """Inner detail: drawn on the colour only (it sits inside an existing part)."""
        cv2.circle(self.rgb, self.p(*c, fixed=fixed), max(1, int(round(r * self.u))), colour, -1)

    def eye(self, c, rx: float, ry: float, fixed=False) -> None:
        cv2.ellipse(self.rgb, self.p(*c, fixed=fixed), (self._s(rx), self._s(ry)), 0, 0, 360, OUTLINE, -1)
        hl = (c[0] + 0.35 * rx, c[1] - 0.35 * ry)
        cv2.circle(
            self.rgb, self.p(*hl, fixed=fixed), max(1, int(round(0.3 * rx * self.u))), (255, 255, 255), -1
        )

    def line(self, a, b, colour=OUTLINE, fixed=False) -> None:
        cv2.line(self.rgb, self.p(*a, fixed=fixed), self.p(*b, fixed=fixed), colour, max(1, self.t - 1))


def _human(pen: _Pen, spec: CharacterSpec, pose: float, build: str) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    bob = -2.5 * abs(math.sin(2 * math.pi * pose))
    wide = 1.25 if build == "big" else 1.0
    hip_y = -46 + bob
    sh_y = -84 + bob
    head_y = -104 + bob
    # legs (back one first)
    leg = c.get("pants", c.get("legs", SKIN))
    if build != "kimono":
        for side, sw in ((-1, -s), (1, s)):
            foot = (side * 9 * wide + 9 * sw, -4)
            pen.limb((side * 8 * wide, hip_y), foot, 10 * wide, leg)
            pen.ellipse((foot[0] + 3, -3), (8 * wide, 4.5), c["shoes"])
    else:
        for side in (-1, 1):
            pen.ellipse((side * 9 + 3 * s * side, -4), (8, 4.5), c["shoes"])
    # back arm
    arm_c = c.get("shirt", c.get("jacket", c.get("dress", c.get("kimono"))))
    pen.limb((-15 * wide, sh_y + 4), (-21 * wide - 10 * s, sh_y + 32), 8 * wide, arm_c)
    pen.ellipse((-21 * wide - 10 * s, sh_y + 35), (4.5, 4.5), c["skin"])
    # torso
    if build == "dress":
        pen.poly([(-13, sh_y), (13, sh_y), (24, hip_y + 14), (-24, hip_y + 14)], c["dress"])
    elif build == "kimono":
        pen.poly([(-15, sh_y), (15, sh_y), (19, -7), (-19, -7)], c["kimono"])
        pen.poly([(-16, sh_y + 22), (16, sh_y + 22), (16.5, sh_y + 31), (-16.5, sh_y + 31)], c["obi"])
        pen.line((0, sh_y + 1), (-8, sh_y + 22))
    elif build == "skirt":
        pen.poly([(-18, hip_y - 4), (18, hip_y - 4), (24, hip_y + 12), (-24, hip_y + 12)], c["skirt"])
        pen.poly([(-15, sh_y), (15, sh_y), (16, hip_y - 2), (-16, hip_y - 2)], c["jacket"])
        pen.line((0, sh_y + 2), (0, hip_y - 3))
    else:
        pen.poly(
            [(-16 * wide, sh_y), (16 * wide, sh_y), (15 * wide, hip_y + 2), (-15 * wide, hip_y + 2)],
            c["shirt"],
        )
        if "stripe" in c:  # asymmetric mark: stays on the image-left side
            pen.poly(
                [(-12, sh_y + 3), (-6, sh_y + 3), (-6, hip_y - 1), (-12, hip_y - 1)], c["stripe"], fixed=True
            )
        if "badge" in c:
            pen.ellipse((-8 * wide, sh_y + 13), (7, 7), c["badge"], fixed=True)
    # long hair behind the head
    if build == "skirt":
        pen.poly([(-20, head_y - 6), (20, head_y - 6), (23, head_y + 36), (-23, head_y + 36)], c["hair"])
    if build == "dress":  # twin tails
        for side in (-1, 1):
            pen.ellipse((side * 26, head_y + 6 + 2 * s * side), (7, 17), c["hair"], angle=side * 15)
            pen.ellipse((side * 19, head_y - 8), (4, 4), c["ribbon"])
    # head
    pen.ellipse((0, head_y), (19 * (1.05 if wide > 1 else 1), 20), c["skin"])
    # hair cap
    if build == "kimono":
        pen.ellipse((0, head_y - 20), (10, 8), c["hair"])  # bun
        pen.ellipse((0, head_y - 5), (20, 17), c["hair"], arc=(180, 360))
    elif build == "big":
        pen.poly(
            [
                (-22, head_y - 2),
                (-18, head_y - 24),
                (-8, head_y - 18),
                (0, head_y - 30),
                (8, head_y - 18),
                (18, head_y - 24),
                (22, head_y - 2),
                (12, head_y - 12),
                (-12, head_y - 12),
            ],
            c["hair"],
        )
    else:
        spikes = [
            (-21, head_y + 2),
            (-22, head_y - 14),
            (-14, head_y - 22),
            (-4, head_y - 26),
            (8, head_y - 24),
            (18, head_y - 18),
            (23, head_y - 6),
            (24, head_y + 4),
            (14, head_y - 9),
            (4, head_y - 12),
            (-6, head_y - 8),
            (-14, head_y - 10),
        ]
        if build == "boy":
            spikes.insert(4, (2, head_y - 34))
        pen.poly(spikes, c["hair"])
    if "clip" in c:  # asymmetric mark
        pen.ellipse((-13, head_y - 13), (8, 5), c["clip"], angle=-30, fixed=True)
    # face: eyes look where the character faces
    ex = 4
    pen.eye((-6 + ex, head_y + 2), 2.4, 3.8)
    pen.eye((8 + ex, head_y + 2), 2.4, 3.8)
    pen.line((1 + ex, head_y + 12), (6 + ex, head_y + 12))
    # front arm
    pen.limb((15 * wide, sh_y + 4), (21 * wide + 10 * s, sh_y + 32), 8 * wide, arm_c)
    pen.ellipse((21 * wide + 10 * s, sh_y + 35), (4.5, 4.5), c["skin"])


def _ghost(pen: _Pen, spec: CharacterSpec, pose: float) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    bob = -5 - 4 * math.sin(2 * math.pi * pose)
    y = -62 + bob
    sway = 8 * s
    pen.poly(
        [(-24, y + 10), (24, y + 10), (12 + sway * 0.6, y + 38), (sway, y + 52), (-8 + sway * 0.4, y + 36)],
        c["body"],
    )
    pen.ellipse((0, y), (29, 30), c["body"])
    pen.ellipse((-27, y + 14 + 3 * s), (6, 11), c["body"], angle=30)
    pen.ellipse((27, y + 14 - 3 * s), (6, 11), c["body"], angle=-30)
    pen.eye((-9, y - 4), 3.0, 5.0)
    pen.eye((9, y - 4), 3.0, 5.0)
    pen.ellipse((0, y + 12), (9, 5), c["lips"])
    pen.dot((-18, y + 6), 3.5, c["cheek"])
    pen.dot((18, y + 6), 3.5, c["cheek"])


def _cat(pen: _Pen, spec: CharacterSpec, pose: float) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    bob = -2 * abs(s)
    # two tails behind, waving (directional)
    for k, off in enumerate((0.0, 1.3)):
        w = math.sin(2 * math.pi * pose + off)
        pts = [
            (-12, -20 + bob),
            (-28 - 4 * k, -30 + bob),
            (-34 - 6 * k + 6 * w, -50 + bob - 6 * k),
            (-30 - 8 * k + 10 * w, -66 + bob - 10 * k),
        ]
        pen.curve(pts, 6, c["body"])
        pen.ellipse(pts[-1], (4.5, 4.5), c["tail_tip"])
    # legs
    for side in (-1, 1):
        pen.limb((side * 9, -16 + bob), (side * 10 + 3 * s * side, -4), 9, c["body"])
    pen.ellipse((0, -28 + bob), (18, 17), c["body"])
    pen.poly([(-17, -33 + bob), (17, -33 + bob), (17, -25 + bob), (-17, -25 + bob)], c["band"])
    # arms
    pen.limb((-15, -38 + bob), (-22 - 5 * s, -26 + bob), 7, c["body"])
    pen.limb((15, -38 + bob), (22 + 5 * s, -26 + bob), 7, c["body"])
    hy = -66 + bob
    for side in (-1, 1):
        pen.poly([(side * 8, hy - 20), (side * 25, hy - 40), (side * 24, hy - 12)], c["body"])
        pen.poly([(side * 12, hy - 21), (side * 22, hy - 33), (side * 21, hy - 17)], c["ear"], outline=False)
    pen.ellipse((0, hy), (27, 24), c["body"])
    pen.ellipse((3, hy + 9), (11, 7), c["muzzle"])
    pen.eye((-8, hy - 4), 3.5, 5.0)
    pen.eye((12, hy - 4), 3.5, 5.0)
    pen.dot((3, hy + 5), 2.2, (255, 130, 150))


def _cyclops(pen: _Pen, spec: CharacterSpec, pose: float) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    hop = -6 * abs(s)
    for side in (-1, 1):
        pen.ellipse((side * 14, -5 + hop * 0.7), (10, 6), c["feet"])
    pen.poly([(-6, -70 + hop), (0, -88 + hop), (6, -70 + hop)], c["horn"])
    pen.ellipse((0, -40 + hop), (32, 32), c["body"])
    pen.ellipse((2, -44 + hop), (15, 13), c["eye"])
    pen.dot((5, -44 + hop), 8, c["iris"])
    pen.dot((6, -44 + hop), 4.5)
    pen.dot((8, -47 + hop), 1.6, (255, 255, 255))
    pen.line((-8, -20 + hop), (10, -20 + hop))
    pen.limb((-30, -40 + hop), (-40, -52 + hop - 6 * s), 6, c["body"])
    pen.limb((30, -40 + hop), (40, -52 + hop + 6 * s), 6, c["body"])


def _fish(pen: _Pen, spec: CharacterSpec, pose: float) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    y = -44
    for k, side in enumerate((-1, 1)):
        pen.limb((side * 10, y + 14), (side * 11 + 5 * s * (1 if k else -1), -4), 5, c["legs"])
    pen.poly([(-34, y), (-58, y - 18 - 6 * s), (-52, y), (-58, y + 18 - 6 * s)], c["fin"])  # tail fin
    pen.poly([(-14, y - 18), (0, y - 36 + 3 * s), (12, y - 18)], c["fin"])  # dorsal fin
    pen.ellipse((0, y), (38, 21), c["body"])
    pen.ellipse((6, y + 9), (24, 8), c["belly"], outline=False)
    pen.eye((22, y - 6), 3.5, 4.5)
    pen.line((30, y + 7), (36, y + 5))
    pen.line((8, y - 12), (8, y + 4))
    pen.ellipse((-12, y - 2), (7, 6), c["patch"], fixed=True)  # asymmetric mark


def _kappa(pen: _Pen, spec: CharacterSpec, pose: float) -> None:
    c = spec.colours
    s = math.sin(2 * math.pi * pose)
    bob = -2 * abs(s)
    pen.ellipse((-16, -36 + bob), (13, 20), c["shell"])  # shell on the back
    for side in (-1, 1):
        pen.limb((side * 7, -22 + bob), (side * 9 + 6 * s * side, -4), 8, c["body"])
    pen.ellipse((0, -36 + bob), (16, 20), c["body"])
    pen.ellipse((3, -34 + bob), (9, 14), c["belly"], outline=False)
    pen.limb((12, -46 + bob), (22 + 6 * s, -30 + bob), 6, c["body"])
    hy = -70 + bob
    pen.ellipse((0, hy), (20, 18), c["body"])
    pen.ellipse((0, hy - 16), (13, 5), c["plate"])
    pen.poly([(14, hy + 2), (30, hy + 6), (14, hy + 11)], c["beak"])
    pen.eye((2, hy - 3), 2.8, 4.2)
    pen.eye((12, hy - 3), 2.8, 4.2)


_BUILDS = {0: "boy", 2: "dress", 4: "big", 7: "skirt", 9: "kimono"}
_YOKAI_DRAW: dict[int, Callable[[_Pen, CharacterSpec, float], None]] = {
    1: _ghost,
    3: _cat,
    5: _cyclops,
    6: _kappa,
    8: _fish,
}


def _render_full(
    char_id: int, scale: float, facing: int, pose: float, variant: Variant = VARIANTS["default"]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Render on the local canvas; returns (rgb, mask, origin_xy) before cropping."""
    if char_id not in CHARACTER_BY_ID:
        raise ValueError(f"unknown character id {char_id}; ids are 0..{len(CHARACTERS) - 1}")
    spec = variant_characters(variant)[char_id] if variant.name != "default" else CHARACTER_BY_ID[char_id]
    pen = _Pen(0.9 * scale, facing)
    if char_id in _BUILDS:
        _human(pen, spec, pose, _BUILDS[char_id])
    elif variant.shared_shape and char_id == 6:
        _cat(pen, spec, pose)
    else:
        _YOKAI_DRAW[char_id](pen, spec, pose)
    if pen.flip:
        return pen.rgb[:, ::-1], pen.mask[:, ::-1], (pen.w - 1 - pen.ox, pen.oy)
    return pen.rgb, pen.mask, (pen.ox, pen.oy)


def _render_crop(
    char_id: int, scale: float, facing: int, pose: float, variant: Variant = VARIANTS["default"]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Tight crop: (rgb, mask, (dx, dy)) where (dx, dy) is the feet origin relative to the crop's top-left."""
    rgb, mask, (ox, oy) = _render_full(char_id, scale, facing, pose, variant)
    mask = np.ascontiguousarray(mask)
    x0, y0, bw, bh = cv2.boundingRect(mask)  # of the non-zero pixels; much faster than np.nonzero
    x1, y1 = x0 + bw, y0 + bh
    return rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1], (int(round(ox)) - x0, int(round(oy)) - y0)


def render_character(
    char_id: int, *, scale: float = 1.0, facing: int = 1, pose: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Render one character as an RGBA tight crop.

    Args:
        char_id: Id from :data:`CHARACTERS`.
        scale: 1.0 is about 112 px tall for a human.
        facing: 1 faces right, -1 faces left (directional parts mirrored).
        pose: Animation phase; limbs, tails and bob cycle with period 1.
        seed: Accepted for API symmetry; the design is fully determined by the other arguments.

    Returns:
        uint8 array (h, w, 4); alpha is 255 on the character and 0 elsewhere.
    """
    del seed
    rgb, mask, _ = _render_crop(char_id, scale, facing, pose)
    return np.dstack([rgb, mask]).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Backgrounds (painted: gradients and flat shapes, no lines, nothing near black)


def _vgrad(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    g = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.repeat(g, w, axis=1)


def _fill_rows(img: np.ndarray, y0: int, top, bottom) -> None:
    img[y0:] = _vgrad(img.shape[0] - y0, img.shape[1], top, bottom)


def _hills(img: np.ndarray, rng: np.random.Generator, base: float, amp: float, colour, freq: float) -> None:
    h, w = img.shape[:2]
    xs = np.arange(w, dtype=np.float32)
    ph = rng.uniform(0, 2 * math.pi, 2)
    ys = base * h + amp * h * (
        0.6 * np.sin(xs * freq / w * 2 * math.pi + ph[0])
        + 0.4 * np.sin(xs * freq * 2.3 / w * 2 * math.pi + ph[1])
    )
    pts = np.concatenate([np.stack([xs, ys], 1), [[w - 1, h - 1], [0, h - 1]]]).astype(np.int32)
    cv2.fillPoly(img, [pts], colour)


def _bg_meadow(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (110, 170, 240), (200, 230, 250))
    cv2.circle(img, (int(w * rng.uniform(0.2, 0.8)), int(h * 0.18)), int(h * 0.08), (255, 246, 200), -1)
    for _ in range(5):
        cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0.08, 0.35) * h)
        for dx in (-1, 0, 1):
            cv2.ellipse(
                img,
                (cx + dx * int(h * 0.06), cy),
                (int(h * 0.07), int(h * 0.04)),
                0,
                0,
                360,
                (250, 252, 255),
                -1,
            )
    _hills(img, rng, 0.52, 0.06, (130, 190, 140), 2.0)
    _hills(img, rng, 0.66, 0.04, (110, 176, 90), 3.0)
    g = _vgrad(h - int(h * 0.74), w, (120, 190, 80), (150, 206, 100))
    img[int(h * 0.74) :] = g
    x = int(rng.uniform(0, 60))
    while x < w:
        if rng.random() < 0.35:  # a small house
            hw = int(h * rng.uniform(0.18, 0.26))
            top = int(h * 0.56)
            cv2.rectangle(img, (x, top), (x + hw, int(h * 0.76)), (246, 236, 214), -1)
            cv2.fillPoly(
                img,
                [np.array([(x - 8, top), (x + hw // 2, top - int(h * 0.1)), (x + hw + 8, top)], np.int32)],
                (200, 90, 80),
            )
            cv2.rectangle(
                img, (x + hw // 3, int(h * 0.64)), (x + hw // 3 + 14, int(h * 0.76)), (160, 110, 80), -1
            )
            x += hw + int(h * rng.uniform(0.15, 0.4))
        else:  # a tree
            r = int(h * rng.uniform(0.07, 0.12))
            ty = int(h * rng.uniform(0.5, 0.6))
            cv2.rectangle(img, (x - r // 5, ty), (x + r // 5, int(h * 0.77)), (150, 110, 76), -1)
            cv2.circle(img, (x, ty), r, (80, 160, 80), -1)
            x += int(h * rng.uniform(0.2, 0.5))
    return img


def _bg_town(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (250, 150, 120), (255, 214, 160))
    x = 0
    while x < w:
        bw = int(rng.uniform(0.12, 0.22) * h * 1.4)
        top = int(rng.uniform(0.18, 0.45) * h)
        col = tuple(
            int(v) for v in rng.choice([(150, 110, 160), (170, 120, 140), (130, 110, 170), (180, 140, 150)])
        )
        cv2.rectangle(img, (x, top), (x + bw, int(h * 0.72)), col, -1)
        for wy in range(top + 12, int(h * 0.68), 22):
            for wx in range(x + 8, x + bw - 14, 20):
                if rng.random() < 0.6:
                    cv2.rectangle(img, (wx, wy), (wx + 9, wy + 11), (255, 236, 150), -1)
        x += bw + int(rng.uniform(2, 16))
    img[int(h * 0.72) :] = _vgrad(h - int(h * 0.72), w, (170, 160, 170), (200, 190, 190))
    cv2.rectangle(img, (0, int(h * 0.84)), (w, int(h * 0.85)), (236, 230, 210), -1)
    return img


def _bg_forest(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (200, 236, 210), (170, 220, 180))
    _hills(img, rng, 0.40, 0.08, (120, 180, 130), 2.5)
    x = int(rng.uniform(0, 40))
    while x < w:
        tw = int(rng.uniform(0.04, 0.07) * h)
        cv2.rectangle(img, (x, int(h * 0.3)), (x + tw, int(h * 0.8)), (150, 104, 70), -1)
        cv2.ellipse(
            img,
            (x + tw // 2, int(h * rng.uniform(0.2, 0.3))),
            (int(tw * 2.6), int(h * 0.16)),
            0,
            0,
            360,
            (60, 140, 70),
            -1,
        )
        x += int(rng.uniform(0.25, 0.45) * h)
    img[int(h * 0.78) :] = _vgrad(h - int(h * 0.78), w, (120, 160, 80), (150, 180, 100))
    return img


def _bg_classroom(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (240, 226, 196), (226, 208, 176))
    img[int(h * 0.75) :] = _vgrad(h - int(h * 0.75), w, (196, 150, 100), (176, 128, 86))
    board_x = int(w * rng.uniform(0.1, 0.3))
    cv2.rectangle(img, (board_x, int(h * 0.15)), (board_x + int(w * 0.35), int(h * 0.5)), (60, 110, 80), -1)
    for k in range(3):
        wx = int(w * (0.6 + k * 0.13))
        cv2.rectangle(img, (wx, int(h * 0.12)), (wx + int(w * 0.1), int(h * 0.55)), (170, 214, 246), -1)
        cv2.rectangle(img, (wx, int(h * 0.32)), (wx + int(w * 0.1), int(h * 0.34)), (246, 240, 226), -1)
    cv2.rectangle(img, (0, int(h * 0.73)), (w, int(h * 0.75)), (170, 130, 90), -1)
    cv2.circle(img, (int(w * rng.uniform(0.45, 0.55)), int(h * 0.12)), int(h * 0.05), (250, 250, 246), -1)
    x = int(rng.uniform(0, 50))
    while x < w:  # desks
        dw = int(h * 0.22)
        cv2.rectangle(img, (x, int(h * 0.62)), (x + dw, int(h * 0.66)), (210, 170, 120), -1)
        cv2.rectangle(img, (x + 6, int(h * 0.66)), (x + 12, int(h * 0.8)), (150, 150, 160), -1)
        cv2.rectangle(img, (x + dw - 12, int(h * 0.66)), (x + dw - 6, int(h * 0.8)), (150, 150, 160), -1)
        x += dw + int(h * rng.uniform(0.12, 0.3))
    return img


def _bg_night(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (40, 50, 120), (90, 90, 160))
    for _ in range(60):
        cv2.circle(img, (int(rng.uniform(0, w)), int(rng.uniform(0, 0.5) * h)), 1, (250, 250, 210), -1)
    cv2.circle(img, (int(w * rng.uniform(0.3, 0.7)), int(h * 0.2)), int(h * 0.07), (250, 246, 210), -1)
    x = 0
    while x < w:
        bw = int(rng.uniform(0.15, 0.3) * h)
        top = int(rng.uniform(0.35, 0.55) * h)
        cv2.rectangle(img, (x, top), (x + bw, h), (70, 80, 140), -1)
        for wy in range(top + 10, h - 60, 24):
            if rng.random() < 0.5:
                cv2.rectangle(img, (x + 8, wy), (x + 16, wy + 10), (255, 220, 120), -1)
        x += bw + int(rng.uniform(4, 20))
    img[int(h * 0.8) :] = _vgrad(h - int(h * 0.8), w, (90, 96, 140), (110, 110, 150))
    return img


def _bg_beach(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (90, 200, 250), (190, 236, 252))
    img[int(h * 0.45) :] = _vgrad(h - int(h * 0.45), w, (40, 150, 210), (110, 200, 230))
    for _ in range(14):
        x, y = int(rng.uniform(0, w)), int(rng.uniform(0.5, 0.68) * h)
        cv2.ellipse(img, (x, y), (int(h * 0.05), 2), 0, 0, 360, (200, 240, 250), -1)
    _hills(img, rng, 0.70, 0.03, (246, 226, 170), 1.5)
    x = int(rng.uniform(0, 80))
    while x < w:
        kind = rng.integers(0, 3)
        if kind == 0:  # palm tree
            cv2.line(img, (x, int(h * 0.8)), (x + 20, int(h * 0.3)), (170, 120, 80), 9)
            for ang in (-40, -10, 20, 160, 190):
                cx, cy = x + 20, int(h * 0.3)
                ex = int(cx + math.cos(math.radians(ang)) * h * 0.12)
                ey = int(cy + math.sin(math.radians(ang)) * h * 0.05 + h * 0.03)
                cv2.ellipse(
                    img,
                    ((cx + ex) // 2, (cy + ey) // 2),
                    (int(h * 0.07), int(h * 0.02)),
                    ang,
                    0,
                    360,
                    (70, 170, 90),
                    -1,
                )
        elif kind == 1:  # rock
            cv2.ellipse(
                img, (x, int(h * 0.78)), (int(h * 0.08), int(h * 0.05)), 0, 180, 360, (170, 160, 150), -1
            )
        else:  # beach umbrella
            cv2.line(img, (x, int(h * 0.6)), (x, int(h * 0.82)), (230, 230, 230), 4)
            cv2.ellipse(
                img,
                (x, int(h * 0.6)),
                (int(h * 0.1), int(h * 0.06)),
                0,
                180,
                360,
                (250, 110, 110) if rng.random() < 0.5 else (110, 150, 250),
                -1,
            )
        x += int(h * rng.uniform(0.35, 0.7))
    return img


def _bg_river(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (170, 210, 250), (230, 240, 250))
    _hills(img, rng, 0.42, 0.07, (150, 170, 200), 1.2)
    img[int(h * 0.55) :] = _vgrad(h - int(h * 0.55), w, (140, 200, 120), (120, 180, 100))
    pts = np.array([(0, int(h * 0.62)), (w, int(h * 0.58)), (w, int(h * 0.72)), (0, int(h * 0.76))], np.int32)
    cv2.fillPoly(img, [pts], (90, 160, 220))
    bx = int(w * rng.uniform(0.3, 0.6))
    cv2.ellipse(img, (bx, int(h * 0.66)), (int(h * 0.35), int(h * 0.12)), 0, 180, 360, (210, 120, 80), 10)
    for px in range(bx - int(h * 0.3), bx + int(h * 0.3) + 1, int(h * 0.1)):
        cv2.rectangle(img, (px, int(h * 0.55)), (px + 5, int(h * 0.66)), (220, 140, 90), -1)
    for _ in range(6):
        cx = int(rng.uniform(0, w))
        cv2.circle(
            img, (cx, int(h * rng.uniform(0.45, 0.52))), int(h * rng.uniform(0.05, 0.09)), (90, 170, 100), -1
        )
    return img


def _bg_room(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (214, 230, 214), (196, 216, 200))
    img[int(h * 0.78) :] = _vgrad(h - int(h * 0.78), w, (230, 200, 150), (214, 180, 130))
    x = int(rng.uniform(10, 60))
    while x < w:
        kind = rng.integers(0, 3)
        if kind == 0:  # poster
            pw, ph_ = int(h * 0.18), int(h * 0.24)
            col = tuple(int(v) for v in rng.integers(110, 250, 3))
            cv2.rectangle(img, (x, int(h * 0.15)), (x + pw, int(h * 0.15) + ph_), col, -1)
            cv2.circle(img, (x + pw // 2, int(h * 0.15) + ph_ // 2), pw // 4, (250, 250, 240), -1)
            x += pw + int(h * 0.2)
        elif kind == 1:  # shelf with books
            sw = int(h * 0.35)
            cv2.rectangle(img, (x, int(h * 0.35)), (x + sw, int(h * 0.78)), (180, 130, 90), -1)
            for by in (int(h * 0.4), int(h * 0.55)):
                bx = x + 6
                while bx < x + sw - 14:
                    bw = int(rng.integers(7, 14))
                    col = tuple(int(v) for v in rng.integers(90, 250, 3))
                    cv2.rectangle(img, (bx, by), (bx + bw, by + int(h * 0.1)), col, -1)
                    bx += bw + 2
            x += sw + int(h * 0.2)
        else:  # window
            ww = int(h * 0.3)
            cv2.rectangle(img, (x, int(h * 0.12)), (x + ww, int(h * 0.5)), (170, 220, 250), -1)
            cv2.rectangle(
                img, (x + ww // 2 - 2, int(h * 0.12)), (x + ww // 2 + 2, int(h * 0.5)), (240, 240, 230), -1
            )
            x += ww + int(h * 0.25)
    return img


def _bg_shrine(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _vgrad(h, w, (250, 214, 226), (255, 240, 220))
    _hills(img, rng, 0.5, 0.05, (160, 196, 150), 1.7)
    img[int(h * 0.76) :] = _vgrad(h - int(h * 0.76), w, (200, 196, 190), (216, 210, 200))
    for k in range(2):
        cx = int(w * (0.25 + 0.5 * k + rng.uniform(-0.05, 0.05)))
        pw = int(h * 0.5)
        cv2.rectangle(img, (cx - pw // 2, int(h * 0.2)), (cx + pw // 2, int(h * 0.25)), (220, 70, 60), -1)
        cv2.rectangle(
            img, (cx - pw // 2 + 15, int(h * 0.3)), (cx + pw // 2 - 15, int(h * 0.33)), (220, 70, 60), -1
        )
        for sx in (cx - pw // 2 + 25, cx + pw // 2 - 35):
            cv2.rectangle(img, (sx, int(h * 0.2)), (sx + 10, int(h * 0.77)), (210, 66, 56), -1)
    x = int(rng.uniform(0, 40))
    while x < w:
        if rng.random() < 0.5:  # stone lantern
            cv2.rectangle(img, (x - 6, int(h * 0.6)), (x + 6, int(h * 0.78)), (180, 176, 170), -1)
            cv2.rectangle(img, (x - 14, int(h * 0.55)), (x + 14, int(h * 0.61)), (190, 186, 180), -1)
            cv2.rectangle(img, (x - 8, int(h * 0.5)), (x + 8, int(h * 0.55)), (250, 220, 140), -1)
        else:  # pine
            cv2.fillPoly(
                img,
                [
                    np.array(
                        [
                            (x - int(h * 0.09), int(h * 0.6)),
                            (x, int(h * 0.3)),
                            (x + int(h * 0.09), int(h * 0.6)),
                        ],
                        np.int32,
                    )
                ],
                (70, 140, 100),
            )
            cv2.rectangle(img, (x - 4, int(h * 0.6)), (x + 4, int(h * 0.77)), (150, 100, 70), -1)
        x += int(h * rng.uniform(0.3, 0.6))
    return img


_BACKGROUNDS: list[tuple[str, Callable[[int, int, np.random.Generator], np.ndarray]]] = [
    ("meadow", _bg_meadow),
    ("town", _bg_town),
    ("forest", _bg_forest),
    ("classroom", _bg_classroom),
    ("night", _bg_night),
    ("beach", _bg_beach),
    ("shrine", _bg_shrine),
    ("river", _bg_river),
    ("room", _bg_room),
]


def paint_backgrounds(height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Paint the series' backgrounds, each 1.6x the frame width (room for pans), RGB uint8.

    No background pixel is near black: pixels whose brightest channel is below 64 are lifted,
    so black in a frame can only come from character line art.
    """
    out = []
    bw = int(width * 1.6)
    for k, (_, paint) in enumerate(_BACKGROUNDS):
        rng = np.random.default_rng([seed, 1000 + k])
        img = np.clip(paint(height, bw, rng), 0, 255)
        mx = img.max(axis=2, keepdims=True)
        img = np.where(mx < 64, img + (64 - mx), img)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _draw_props(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Outlined background props (the ``props`` variant): houses, signs, posts and fences in line art.

    Drawn like characters (flat fill, black 2 px outlines, closed shapes) but static on the
    background, so they pan with the camera and never move against it.
    """
    img = bg.copy()
    h, w = img.shape[:2]
    x = int(rng.uniform(0, 0.1 * h))
    while x < w:
        kind = int(rng.integers(0, 3))
        fill = tuple(int(v) for v in rng.integers(120, 240, 3))
        if kind == 0:  # house: wall, roof, outlined windows and a door
            hw, top, base = int(h * rng.uniform(0.2, 0.32)), int(h * rng.uniform(0.3, 0.5)), int(h * 0.74)
            cv2.rectangle(img, (x, top), (x + hw, base), fill, -1)
            cv2.rectangle(img, (x, top), (x + hw, base), OUTLINE, 2)
            roof = np.array([(x - 6, top), (x + hw // 2, top - int(h * 0.09)), (x + hw + 6, top)], np.int32)
            cv2.fillPoly(img, [roof], (190, 80, 70))
            cv2.polylines(img, [roof], True, OUTLINE, 2)
            for wx in range(x + 8, x + hw - 16, 22):
                cv2.rectangle(img, (wx, top + 10), (wx + 12, top + 24), (250, 230, 150), -1)
                cv2.rectangle(img, (wx, top + 10), (wx + 12, top + 24), OUTLINE, 2)
            x += hw + int(h * rng.uniform(0.08, 0.3))
        elif kind == 1:  # signboard on a post
            sw, top = int(h * rng.uniform(0.1, 0.16)), int(h * rng.uniform(0.45, 0.6))
            cv2.rectangle(img, (x + sw // 2 - 3, top), (x + sw // 2 + 3, int(h * 0.78)), (150, 110, 80), -1)
            cv2.rectangle(img, (x + sw // 2 - 3, top), (x + sw // 2 + 3, int(h * 0.78)), OUTLINE, 2)
            cv2.rectangle(img, (x, top - int(h * 0.08)), (x + sw, top), fill, -1)
            cv2.rectangle(img, (x, top - int(h * 0.08)), (x + sw, top), OUTLINE, 2)
            x += sw + int(h * rng.uniform(0.1, 0.3))
        else:  # fence of outlined pickets
            n = int(rng.integers(3, 7))
            for k in range(n):
                px = x + k * 14
                pts = np.array(
                    [
                        (px, int(h * 0.78)),
                        (px, int(h * 0.66)),
                        (px + 5, int(h * 0.63)),
                        (px + 10, int(h * 0.66)),
                        (px + 10, int(h * 0.78)),
                    ],
                    np.int32,
                )
                cv2.fillPoly(img, [pts], (236, 226, 200))
                cv2.polylines(img, [pts], True, OUTLINE, 2)
            x += n * 14 + int(h * rng.uniform(0.1, 0.3))
    return img


# --------------------------------------------------------------------------------------
# Schedule


@dataclass
class _Actor:
    char_id: int
    scale: float
    facing: int
    x0: float  # feet origin at the shot start (frame px)
    x1: float  # ... at the shot end
    y: float
    pose0: float
    pose_speed: float  # pose units per frame


@dataclass
class _Shot:
    start: int
    end: int
    background: int
    pan0: float
    pan1: float
    actors: list[_Actor] = field(default_factory=list)
    cast: list[int] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """Where a generated series lives."""

    root: Path
    episodes: list[Path]
    ground_truth: list[Path]
    characters: Path
    params: dict[str, Any]

    @property
    def episodes_dir(self) -> Path:
        return self.root / "episodes"

    @property
    def ground_truth_dir(self) -> Path:
        return self.root / "ground_truth"


_envelope_cache: dict[tuple, tuple[int, int, int, int]] = {}


def _envelope(
    char_id: int, scale: float, facing: int, variant: Variant = VARIANTS["default"]
) -> tuple[int, int, int, int]:
    """Max extents (left, right, up, down) in px around the feet origin over the pose cycle."""
    key = (char_id, scale, facing) if variant.name == "default" else (char_id, scale, facing, variant)
    if key not in _envelope_cache:
        left = right = up = down = 0
        for k in range(24):
            _, m, (dx, dy) = _render_crop(char_id, scale, facing, k / 24, variant)
            left, right = max(left, dx), max(right, m.shape[1] - dx)
            up, down = max(up, dy), max(down, m.shape[0] - dy)
        pad = 3  # poses between the samples may poke out a little further
        _envelope_cache[key] = (left + pad, right + pad, up + pad, down + pad)
    return _envelope_cache[key]


def _shot_lengths(n: int, fps: float, rng: np.random.Generator) -> list[int]:
    """Split ``n`` frames into shots of about 0.9-1.9 s (short shots, like a TV cut)."""
    lo, hi = max(8, round(0.9 * fps)), max(10, round(1.9 * fps))
    out: list[int] = []
    left = n
    while left > 0:
        k = int(rng.integers(lo, hi + 1))
        if left - k < lo:  # the remainder would be too short for a shot: take it all
            k = left
        out.append(k)
        left -= k
    return out


def _assign_casts(n_shots: int, rng: np.random.Generator) -> list[list[int]]:
    """Spread each character over round(share * n_shots) distinct shots, 1-3 per shot."""
    casts: list[list[int]] = [[] for _ in range(n_shots)]
    quotas = sorted(
        ((max(1, round(c.share * n_shots)), c.id) for c in CHARACTERS), key=lambda q: (-q[0], q[1])
    )
    for quota, cid in quotas:
        order = sorted(range(n_shots), key=lambda i: (len(casts[i]), rng.random()))
        for i in [i for i in order if len(casts[i]) < 3][:quota]:
            casts[i].append(cid)
    for i, cast in enumerate(casts):
        if not cast:  # only when the episode is too short for the shares
            cast.append(int(rng.choice([c.id for c in CHARACTERS[:4]])))
        rng.shuffle(cast)
        casts[i] = cast
    return casts


def _fit_scale(
    cid: int, facing: int, scale: float, max_w: float, height: int, variant: Variant
) -> tuple[float, tuple[int, int, int, int]]:
    """The largest scale (in steps of 0.05 from ``scale``) whose envelope fits ``max_w`` and the frame height."""
    while True:
        scale = round(scale * 20) / 20
        env = _envelope(cid, scale, facing, variant)
        if env[0] + env[1] <= max_w - 2 and env[2] + env[3] <= height - 2 * MARGIN - 2:
            return scale, env
        scale -= 0.05
        if scale < 0.3:
            raise ValueError(f"frame {max_w:.0f}x{height} too small for a character")


def _layout_hard(shot: _Shot, width: int, height: int, rng: np.random.Generator, variant: Variant) -> None:
    """Harder layouts: overlapping casts that walk past each other, and walks across a frame edge.

    With ``overlap`` the cast stands in lanes a third narrower than their characters, facing
    and walking towards each other, so neighbours overlap (the later one in front). With
    ``edge`` one end of the cast starts or ends partly outside the frame.
    """
    k = len(shot.cast)
    n = shot.end - shot.start
    lane_w = (width - 2 * MARGIN - (k - 1) * GAP) / k
    fit_w = lane_w * (1.5 if variant.overlap and k > 1 else 1.0)
    edge_lane = int(rng.integers(0, k)) if variant.edge and rng.random() < 0.6 else -1
    for lane, cid in enumerate(shot.cast):
        facing = 1 if rng.random() < 0.5 else -1
        scale, (left, right, up, down) = _fit_scale(
            cid, facing, float(rng.uniform(0.75, 1.55)), min(fit_w, width * 0.9), height, variant
        )
        centre = MARGIN + (lane + 0.5) * (lane_w + GAP)
        if variant.overlap and k > 1:
            # neighbours walk towards each other and cross: lane centres swap over the shot
            toward = 1 if lane < (k - 1) / 2 else -1
            drift = float(rng.uniform(0.5, 0.9)) * lane_w
            xs = (centre - toward * drift / 2, centre + toward * drift / 2)
        else:
            drift = min(lane_w * 0.6, max(40.0, n * rng.uniform(2.0, 4.0)))
            xs = (
                (centre - drift / 2, centre + drift / 2)
                if rng.random() < 0.5
                else (centre + drift / 2, centre - drift / 2)
            )
        if lane == edge_lane:
            # leave through (or enter from) the nearer edge: 30-60% of the body outside at one end
            out = float(rng.uniform(0.3, 0.6)) * (left + right)
            if centre < width / 2:
                xs = (xs[0], -out + left) if rng.random() < 0.5 else (-out + left, xs[1])
            else:
                xs = (xs[0], width + out - right) if rng.random() < 0.5 else (width + out - right, xs[1])
        else:
            xs = tuple(float(np.clip(x, left + MARGIN, width - right - MARGIN)) for x in xs)
        ymin, ymax = MARGIN + up, height - MARGIN - down
        y = float(rng.uniform(max(ymin, min(ymax, height * 0.72)), ymax)) if ymax > ymin else ymin
        shot.actors.append(
            _Actor(
                cid, scale, facing, xs[0], xs[1], y, float(rng.uniform(0, 1)), float(rng.uniform(0.025, 0.06))
            )
        )


def _layout(
    shot: _Shot, width: int, height: int, rng: np.random.Generator, variant: Variant = VARIANTS["default"]
) -> None:
    """Place the cast in side-by-side lanes so boxes never overlap and stay inside the frame."""
    if variant.overlap or variant.edge:
        _layout_hard(shot, width, height, rng, variant)
        return
    k = len(shot.cast)
    lane_w = (width - 2 * MARGIN - (k - 1) * GAP) / k
    n = shot.end - shot.start
    for lane, cid in enumerate(shot.cast):
        facing = 1 if rng.random() < 0.5 else -1
        lo_x = MARGIN + lane * (lane_w + GAP)
        hi_x = lo_x + lane_w
        scale, (left, right, up, down) = _fit_scale(
            cid, facing, float(rng.uniform(0.75, 1.55)), lane_w, height, variant
        )
        xmin, xmax = lo_x + left, hi_x - right
        room = xmax - xmin
        drift = min(room, max(40.0, n * rng.uniform(2.0, 4.0)))
        xa = float(rng.uniform(xmin, xmax - drift))
        xs = (xa, xa + drift) if rng.random() < 0.5 else (xa + drift, xa)
        ymin, ymax = MARGIN + up, height - MARGIN - down
        y = float(rng.uniform(max(ymin, min(ymax, height * 0.72)), ymax)) if ymax > ymin else ymin
        shot.actors.append(
            _Actor(
                cid, scale, facing, xs[0], xs[1], y, float(rng.uniform(0, 1)), float(rng.uniform(0.025, 0.06))
            )
        )


def _plan_series(
    seed: int,
    episodes: int,
    seconds: float,
    width: int,
    height: int,
    fps: float,
    n_bg: int,
    bg_width: int,
    variant: Variant = VARIANTS["default"],
) -> tuple[list[_Shot], list[list[_Shot]]]:
    """Opening shots (shared by every episode) and each episode's own shots."""
    n_frames = max(1, round(seconds * fps))
    open_len = min(n_frames, round(OPENING_SECONDS * fps))
    rng_open = np.random.default_rng([seed, 7])
    opening: list[_Shot] = []
    half = open_len // 2
    opening_casts = [[0, 1, 3], [2, 0]]
    for k, (a, b) in enumerate(((0, half), (half, open_len))):
        if b <= a:
            continue
        pan = float(rng_open.uniform(0, bg_width - width - 1))
        shot = _Shot(a, b, k, pan, pan + (b - a) * 1.5 * (1 if k == 0 else 0), cast=opening_casts[k])
        shot.pan1 = min(shot.pan1, bg_width - width - 1)
        _layout(shot, width, height, rng_open, variant)
        opening.append(shot)
    rng = np.random.default_rng([seed, 11])
    lengths = [
        _shot_lengths(n_frames - open_len, fps, rng) if n_frames > open_len else [] for _ in range(episodes)
    ]
    casts = _assign_casts(sum(len(x) for x in lengths), rng)
    out: list[list[_Shot]] = []
    ci = 0
    for ep in range(episodes):
        shots: list[_Shot] = []
        start = open_len
        prev_bg = opening[-1].background if opening else -1
        for ln in lengths[ep]:
            bg = int(rng.integers(0, n_bg - 1))
            if bg >= prev_bg:
                bg += 1
            bg %= n_bg
            if bg == prev_bg:
                bg = (bg + 1) % n_bg
            prev_bg = bg
            max_pan = bg_width - width - 1
            p0 = float(rng.uniform(0, max_pan))
            if rng.random() < 0.7:
                speed = float(rng.uniform(2.0, 4.0)) * (1 if rng.random() < 0.5 else -1)
                p1 = float(np.clip(p0 + speed * ln, 0, max_pan))
            else:
                p1 = p0
            shot = _Shot(start, start + ln, bg, p0, p1, cast=casts[ci])
            ci += 1
            _layout(shot, width, height, rng, variant)
            shots.append(shot)
            start += ln
        out.append(shots)
    return opening, out


# --------------------------------------------------------------------------------------
# Rendering frames


def _polygon(mask: np.ndarray, ox: int, oy: int) -> list[list[int]]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, 0.7, True)
    return [[int(p[0][0]) + ox, int(p[0][1]) + oy] for p in c]


def _clip_paste(
    frame: np.ndarray, rgb: np.ndarray, mask: np.ndarray, x: int, y: int
) -> tuple[np.ndarray, int, int] | None:
    """Paste a crop that may stick out of the frame; returns its visible (mask, x, y) or None."""
    h, w = mask.shape
    fh, fw = frame.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(fw, x + w), min(fh, y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    m = np.ascontiguousarray(mask[y0 - y : y1 - y, x0 - x : x1 - x])
    if not m.any():
        return None
    np.copyto(frame[y0:y1, x0:x1], rgb[y0 - y : y1 - y, x0 - x : x1 - x], where=m[:, :, None] > 0)
    return m, x0, y0


def _render_frame(
    shot: _Shot,
    f: int,
    backgrounds: list[np.ndarray],
    width: int,
    height: int,
    variant: Variant = VARIANTS["default"],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    n = max(1, shot.end - shot.start - 1)
    t = (f - shot.start) / n
    pan = int(round(shot.pan0 + (shot.pan1 - shot.pan0) * t))
    frame = backgrounds[shot.background][:, pan : pan + width].copy()
    chars = []
    for a in shot.actors:
        pose = a.pose0 + a.pose_speed * (f - shot.start)
        rgb, mask, (dx, dy) = _render_crop(a.char_id, a.scale, a.facing, pose, variant)
        x = int(round(a.x0 + (a.x1 - a.x0) * t)) - dx
        y = int(round(a.y)) - dy
        h, w = mask.shape
        if x < 0 or y < 0 or x + w > width or y + h > height:  # only the edge variant gets here
            got = _clip_paste(frame, rgb, mask, x, y)
            if got is not None:
                m, vx, vy = got
                mh, mw = m.shape
                chars.append(
                    {"id": a.char_id, "box": [vx, vy, vx + mw, vy + mh], "polygon": _polygon(m, vx, vy)}
                )
            continue
        np.copyto(frame[y : y + h, x : x + w], rgb, where=mask[:, :, None] > 0)
        chars.append(
            {
                "id": a.char_id,
                "box": [int(x), int(y), int(x + w), int(y + h)],
                "polygon": _polygon(mask, int(x), int(y)),
            }
        )
    if variant.night:
        frame = (frame.astype(np.float32) * NIGHT_TINT).astype(np.uint8)
    return frame, chars


def _series_params(
    seed: int, episodes: int, seconds: float, width: int, height: int, fps: float, variant: str = "default"
) -> dict[str, Any]:
    extra = {} if variant == "default" else {"variant": variant}  # the default series.json is unchanged
    return {
        **extra,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "episodes": episodes,
        "seconds": seconds,
        "width": width,
        "height": height,
        "fps": fps,
    }


def _info(out_dir: Path, params: dict[str, Any]) -> SeriesInfo:
    names = [f"ep{k + 1:02d}" for k in range(params["episodes"])]
    return SeriesInfo(
        root=out_dir,
        episodes=[out_dir / "episodes" / f"{n}.mp4" for n in names],
        ground_truth=[out_dir / "ground_truth" / f"{n}.json" for n in names],
        characters=out_dir / "characters.json",
        params=params,
    )


def generate_series(
    out_dir: str | Path,
    *,
    seed: int = 0,
    episodes: int = 3,
    seconds: float = 40.0,
    width: int = 640,
    height: int = 360,
    fps: float = 24,
    variant: str = "default",
) -> SeriesInfo:
    """Write the sample series (videos, ground truth, character list) under ``out_dir``.

    Idempotent: when ``out_dir/series.json`` records the same parameters and every output
    exists, nothing is regenerated. Frames are rendered and encoded one at a time.

    Args:
        out_dir: Destination folder (created).
        seed: Seed of every random choice (layout, schedule, backgrounds).
        episodes: Number of episodes.
        seconds: Length of each episode; the first 4 s are the shared opening.
        width: Frame width in px.
        height: Frame height in px.
        fps: Frames per second.
        variant: A name of :data:`VARIANTS`: "default", or a harder series (outlined props,
            overlaps, night palette, frame-edge crossing, shared colours or shapes; "hard": all).

    Returns:
        The paths of what was written.
    """
    out_dir = Path(out_dir)
    if episodes < 1 or seconds <= 0 or width < 64 or height < 64 or fps <= 0:
        raise ValueError("episodes >= 1, seconds > 0, width/height >= 64 and fps > 0 are required")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
    var = VARIANTS[variant]
    params = _series_params(seed, episodes, float(seconds), width, height, fps, variant)
    info = _info(out_dir, params)
    marker = out_dir / "series.json"
    if marker.exists() and all(p.exists() for p in [*info.episodes, *info.ground_truth, info.characters]):
        try:
            if fsio.read_json(marker) == json.loads(json.dumps(params)):
                return info
        except (OSError, ValueError):
            pass
    marker.unlink(missing_ok=True)
    backgrounds = paint_backgrounds(height, width, seed)
    if var.props:
        backgrounds = [
            _draw_props(bg, np.random.default_rng([seed, 3000 + k])) for k, bg in enumerate(backgrounds)
        ]
    opening, ep_shots = _plan_series(
        seed, episodes, float(seconds), width, height, fps, len(backgrounds), backgrounds[0].shape[1], var
    )
    fsio.atomic_write_json(info.characters, {"characters": [c.to_json() for c in variant_characters(var)]})
    for ep in range(episodes):
        _write_episode(
            info.episodes[ep],
            info.ground_truth[ep],
            opening + ep_shots[ep],
            opening,
            backgrounds,
            width,
            height,
            fps,
            var,
        )
    fsio.atomic_write_json(marker, params)
    return info


def _write_episode(
    video: Path,
    gt_path: Path,
    shots: list[_Shot],
    opening: list[_Shot],
    backgrounds: list[np.ndarray],
    width: int,
    height: int,
    fps: float,
    variant: Variant = VARIANTS["default"],
) -> None:
    frames_gt: list[dict[str, Any]] = []
    n_frames = shots[-1].end
    with fsio.atomic_path(video) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write mp4v video to {tmp}")
        try:
            for sid, shot in enumerate(shots):
                for f in range(shot.start, shot.end):
                    frame, chars = _render_frame(shot, f, backgrounds, width, height, variant)
                    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
                    frames_gt.append({"frame_index": f, "shot_id": sid, "characters": chars})
        finally:
            writer.release()
        cap = cv2.VideoCapture(str(tmp))
        ok, _ = cap.read()
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        if not ok or count != n_frames:
            raise RuntimeError(f"{video}: the written video does not decode ({count} of {n_frames} frames)")
    gt = {
        "episode": video.name,
        "fps": fps,
        "width": width,
        "height": height,
        "n_frames": n_frames,
        "shots": [
            {"shot_id": i, "start": s.start, "end": s.end, "background": _BACKGROUNDS[s.background][0]}
            for i, s in enumerate(shots)
        ],
        "opening": [0, opening[-1].end if opening else 0],
        "frames": frames_gt,
    }
    # compact JSON: polygons for every frame would triple in size when indented
    fsio.atomic_write_text(gt_path, json.dumps(gt, separators=(",", ":"), sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# Ground-truth helpers


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Load one episode's ground truth JSON."""
    try:
        gt = fsio.read_json(path)
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot read ground truth: {exc}") from exc
    if not isinstance(gt, dict) or "frames" not in gt:
        raise BadInputError(path, "not a ground-truth file (no 'frames')")
    return gt


def gt_mask(gt: dict[str, Any], frame_index: int) -> np.ndarray:
    """Label map of one frame: 0 = background, ``char_id + 1`` = that character (int16)."""
    out = np.zeros((gt["height"], gt["width"]), np.int16)
    for ch in gt["frames"][frame_index]["characters"]:
        cv2.fillPoly(out, [np.asarray(ch["polygon"], np.int32)], int(ch["id"]) + 1)
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x0, y0, x1, y1] boxes (x1/y1 exclusive)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ground_truth_labels(
    layer_rows: Iterable[dict[str, Any]], ground_truth_dir: str | Path, min_iou: float = 0.3
) -> dict[str, int | None]:
    """Assign each character layer to the ground-truth character with the highest box IoU.

    Args:
        layer_rows: Layer manifest rows (docs/data-formats.md); background rows are ignored.
        ground_truth_dir: Folder holding ``<episode stem>.json`` ground truth files.
        min_iou: Below this IoU a layer gets None (a false detection).

    Returns:
        layer_id -> character id, or None when no ground-truth box matches.
    """
    gdir = Path(ground_truth_dir)
    cache: dict[str, dict[str, Any] | None] = {}
    out: dict[str, int | None] = {}
    for row in layer_rows:
        if row.get("kind", "character") != "character":
            continue
        ep = Path(str(row.get("episode", row.get("episode_id", "")))).stem
        if ep not in cache:
            p = gdir / f"{ep}.json"
            cache[ep] = load_ground_truth(p) if p.exists() else None
        gt = cache[ep]
        best, best_iou = None, min_iou
        fi = int(row["frame_index"])
        if gt is not None and 0 <= fi < len(gt["frames"]):
            for ch in gt["frames"][fi]["characters"]:
                iou = box_iou(row["box"], ch["box"])
                if iou >= best_iou:
                    best, best_iou = int(ch["id"]), iou
        out[row["layer_id"]] = best
    return out


def character_counts(ground_truth_dir: str | Path, kept: Iterable[tuple[str, int]]) -> dict[int, int]:
    """How many of the ``kept`` (episode_id, frame_index) frames show each character."""
    gdir = Path(ground_truth_dir)
    cache: dict[str, dict[str, Any]] = {}
    counts = {c.id: 0 for c in CHARACTERS}
    for ep, fi in kept:
        if ep not in cache:
            cache[ep] = load_ground_truth(gdir / f"{Path(ep).stem}.json")
        for ch in cache[ep]["frames"][fi]["characters"]:
            counts[int(ch["id"])] += 1
    return counts
