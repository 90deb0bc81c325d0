"""Pydantic configuration: one ``XxxConfig`` per stage, nested in :class:`PipelineConfig`.

These models are the single source of truth: flow parameters (Prefect renders them as
forms), CLI options and prefect.yaml all map onto them. Invalid values are rejected by
validation before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _auto_is_zero(value: Any) -> Any:
    """``"auto"`` (TOML, JSON, the CLI) is kept as 0, so the field stays a plain integer: Prefect's
    custom-run form renders an integer, but a union of an integer and a string turns the whole
    config into a raw JSON box."""
    return 0 if value == "auto" else value


#: A batch size: an integer, or 0 / ``"auto"`` for one chosen from the device's free memory
#: (yokai_pipeline/runtime/batching.py).
AutoBatch = Annotated[int, BeforeValidator(_auto_is_zero)]


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FramesConfig(_Stage):
    """Frame extraction: streaming decode, shot detection, sharp-frame picking, dedup."""

    analysis_width: int = Field(
        160, ge=32, le=1024, description="Width frames are downscaled to for shot detection and hashing."
    )
    shot_threshold: float = Field(
        0.35,
        gt=0,
        le=2,
        description="Histogram distance between consecutive frames that counts as a hard cut.",
    )
    min_shot_frames: int = Field(
        6, ge=1, description="Shots shorter than this (in frames) are merged into the previous shot."
    )
    frames_per_shot: int = Field(
        3, ge=1, le=50, description="Sharp frames kept per shot (spread over the shot)."
    )
    dedup_hamming: int = Field(
        6,
        ge=0,
        le=64,
        description="Perceptual-hash Hamming distance at or below which two frames are near-duplicates.",
    )
    max_side: int = Field(
        0,
        ge=0,
        description="Downscale frames whose longer side exceeds this before saving (0 = keep source size).",
    )
    shot_stack_side: int = Field(
        640,
        ge=0,
        le=4096,
        description="Also save every candidate frame of a shot (up to 3 x frames_per_shot, longer side capped "
        "at this) as the shot's stack, for the offline detector's background plate (0 = no stacks).",
    )
    decoder: Literal["auto", "nvdec", "pyav"] = Field(
        "auto",
        description="auto: NVDEC (PyNvVideoCodec, frames stay on the GPU) when a CUDA device and the package "
        "are present, else PyAV. nvdec: NVDEC, falling back to PyAV for a stream it cannot decode. pyav: CPU.",
    )
    decode_segments: int = Field(
        0,
        ge=0,
        le=64,
        description="Contiguous parts of the episode, cut at keyframes, decoded at once by one decoder each "
        "(0 = auto: one per NVDEC engine share on the GPU, one for PyAV, which threads inside FFmpeg).",
    )
    gpu_batch: int = Field(
        32, ge=1, le=512, description="Frames per batch of GPU frame analysis (halved on CUDA out of memory)."
    )


class LayeringConfig(_Stage):
    """Character/background layering (segmentation)."""

    backend: Literal["offline", "u2net", "u2netp", "isnet"] = Field(
        "offline",
        description="offline: line-art segmenter, no weights. u2net/u2netp: neural saliency model. "
        "isnet: skytnt/anime-segmentation's anime IS-Net (isnetis, rembg's isnet-anime).",
    )
    weights: Path | None = Field(
        None,
        description="Local weight file: U2Net .pth / .safetensors for u2net/u2netp; isnetis.ckpt "
        "(or its net state dict as .pth / .safetensors) for isnet. Required for the neural backends.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: AutoBatch = Field(
        16,
        ge=0,
        le=1024,
        description='Images per forward pass on the GPU; 0 or "auto": the largest power of two the leased GPU\'s free memory holds (at most 128; 16 on the CPU). Halved and retried on out-of-memory.',
    )
    chunk_size: int = Field(32, ge=1, description="Frames per layering task (the unit of retry and resume).")
    mask_threshold: float = Field(
        0.5, gt=0, lt=1, description="Probability above which a pixel is character."
    )
    min_area_frac: float = Field(
        0.002, ge=0, lt=1, description="Connected blobs smaller than this fraction of the frame are dropped."
    )
    crop_margin: float = Field(
        0.06, ge=0, le=1, description="Margin around each character crop, as a fraction of its box size."
    )
    num_workers: int = Field(
        4, ge=1, le=128, description="CPU threads decoding frames and writing layers (overlap the model)."
    )
    worker_processes: bool = Field(
        True,
        description="With num_workers >= 3: cut, inpaint and write layers in that many worker processes "
        "(no shared GIL; started once per process) instead of threads.",
    )
    compile: bool = Field(
        False, description="torch.compile the U2Net model (CUDA; slow first batch, faster afterwards)."
    )
    isnet_input_size: int = Field(
        1024,
        ge=32,
        le=2048,
        multiple_of=32,
        description="isnet backend: square side frames are letterboxed to (upstream trains and infers at 1024).",
    )
    crop_head_frac: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Head crop without a head detector or a visible neck: the top share of the figure "
        "(the anime head-to-body ratio; yokai_pipeline/crops.py).",
    )
    crop_neck_dip: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="A neck is a row this much (share of the figure's widest row) narrower than head and shoulders.",
    )
    crop_upper_frac: float = Field(
        0.55, gt=0, le=1, description="Upper-body crop: the top share of the figure (at least 1.6 heads)."
    )


CropKind = Literal["full_body", "upper_body", "head"]


class CropConfig(_Stage):
    """3-stage crops per character in the dataset (yokai_pipeline/crops.py): which framings, in what shares."""

    kinds: list[CropKind] = Field(
        default_factory=lambda: ["full_body", "upper_body", "head"],
        min_length=1,
        description="Crops of each instance in the training data: full_body (always) plus upper_body / head cut from it (full_body alone = the layers as they are).",
    )
    share: dict[CropKind, float] = Field(
        default_factory=lambda: {"full_body": 0.5, "upper_body": 0.3, "head": 0.2},
        description="Share of a character's crops per kind, over its instances before augmentation (normalised over kinds).",
    )
    min_side: int = Field(
        16, ge=1, description="Crops whose shorter side is below this many pixels are not made."
    )
    seed: int = Field(0, description="Which instances give which crops (seeded per instance and kind).")

    @model_validator(mode="after")
    def _shares_cover_kinds(self) -> CropConfig:
        if "full_body" not in self.kinds:
            raise ValueError(
                "crops.kinds must keep full_body: the instance layers are what clustering, augmentation "
                "and the guide's image counts work on; the other kinds are added to them"
            )
        missing = [k for k in self.kinds if self.share.get(k, 0) <= 0]
        if missing:
            raise ValueError(f"crops.share needs a positive share for every kind in crops.kinds: {missing}")
        return self

    def shares(self) -> dict[str, float]:
        """kind -> share, over ``kinds`` only, summing to 1."""
        total = sum(self.share[k] for k in self.kinds)
        return {k: self.share[k] / total for k in dict.fromkeys(self.kinds)}

    @property
    def enabled(self) -> bool:
        """Whether the dataset holds anything but the full layers."""
        return set(self.kinds) != {"full_body"}


class DetectionConfig(_Stage):
    """Character instances per kept frame, found before layering cuts them out (yokai_pipeline/detection.py)."""

    backend: Literal["offline", "yolo", "none"] = Field(
        "offline",
        description="offline: shot background plate + line art + motion (no weights); yolo: the anime "
        "person/half-body/head detector (detection.model); none: one instance per connected blob of the mask.",
    )
    model: str | None = Field(
        None, description="yolo: local .onnx file or Hugging Face hub id of the detector."
    )
    kind: Literal["person", "halfbody", "head"] = Field("person", description="yolo: which detector.")
    head_model: str | None = Field(
        None,
        description="yolo: the anime head detector (local .onnx or hub id, e.g. deepghs/anime_head_detection) "
        "whose boxes make the head crops; None = head crops from the instance mask's geometry.",
    )
    device: str = Field("auto", description="yolo: auto, cpu, cuda or cuda:N.")
    batch_size: AutoBatch = Field(
        16,
        ge=0,
        le=1024,
        description='yolo: images per forward pass; 0 or "auto": the largest power of two the GPU\'s free memory holds (at most 256; 16 on the CPU). Halved and retried on out-of-memory (torch runtime).',
    )
    score_threshold: float = Field(0.35, ge=0, le=1, description="yolo: lowest box score kept.")
    dark_value: int = Field(
        56, ge=1, le=255, description="offline: line art is darker than this (max channel)."
    )
    line_contrast: float = Field(
        0.55, gt=0, le=1, description="offline: ... and darker than this share of the paint around it."
    )
    big_cell_frac: float = Field(
        0.05,
        gt=0,
        le=1,
        description="offline: regions between lines this large (share of frame) are open background.",
    )
    diff_tol: int = Field(
        24, ge=1, le=255, description="offline: a pixel moved if it differs from the plate by more."
    )
    min_moving_px: int = Field(
        40, ge=1, description="offline: fewest moving pixels that make an outlined figure move."
    )
    motion_frac: float = Field(
        0.02, ge=0, le=1, description="offline: ... or this share of the figure, if more."
    )
    cell_fg_frac: float = Field(
        0.1,
        ge=0,
        le=1,
        description="offline: a region of a moving figure is kept if this share of it differs from the plate.",
    )
    mask_cell_frac: float = Field(
        0.0,
        ge=0,
        le=1,
        description="offline: building the plate, a region of a moving figure is left out if this share of it changed.",
    )
    static_match_frac: float = Field(
        0.9,
        ge=0,
        le=1,
        description="offline: a region (outline included) matches another frame of the shot where this share of it is unchanged; 0 = no static-region cue.",
    )
    static_seen_frac: float = Field(
        0.25,
        ge=0,
        le=1,
        description="offline: ... and the plate saw this share of that region in some frame (the figure elsewhere).",
    )
    static_same_frames: int = Field(
        2,
        ge=0,
        description="offline: a static region the plate never saw on its own is still a prop where it is drawn exactly so (paint and outline) in this many single frames; 0 = off.",
    )
    static_ring_frac: float = Field(
        0.9,
        ge=0,
        le=1,
        description="offline: ... its outline counting as unchanged where this share of it is.",
    )
    still_instance_frac: float = Field(
        0.95,
        ge=0,
        le=1,
        description="offline: an instance this share of whose pixels is still (regions drawn exactly so in other frames, stable outlines) is a prop; 1 = off.",
    )
    revealed_frames: int = Field(
        2,
        ge=0,
        description="offline: an instance is a character where this many other frames of the shot show the background in place of enough of it (min_moving_px, revealed_frac); 0 = off.",
    )
    revealed_frac: float = Field(
        0.01,
        ge=0,
        le=1,
        description="offline: the share of an instance (and at least min_moving_px pixels) that each of revealed_frames other frames must show something else in place of.",
    )
    stray_line_reach: float = Field(
        0.022,
        ge=0,
        le=0.1,
        description="offline: thin line art of a figure farther than this share of the frame height from any of its painted pixels is dropped (a prop's outline left on a figure); 0 = off.",
    )
    detach_frac: float = Field(
        0.25,
        ge=0,
        le=1,
        description="offline: a moving figure loses its static regions (props it touches) when its changing part is this share of it.",
    )
    seen_frac: float = Field(
        0.3,
        ge=0,
        le=1,
        description="offline: the plate saw the background where this share of the shot's frames show it.",
    )
    split_depth: float = Field(
        0.55,
        gt=0,
        lt=1,
        description="offline: touching figures split where a blob has 2+ cores this deep (x its max).",
    )
    min_area_frac: float = Field(0.002, ge=0, le=1, description="Smallest instance (share of the frame).")
    plate_fill: bool = Field(
        True, description="Fill character holes of the background from the plate where it saw them."
    )


class EmbeddingConfig(_Stage):
    """Image embeddings for identity clustering."""

    backend: Literal["offline", "clip", "ccip"] = Field(
        "offline",
        description="offline: colour+shape descriptor, no weights. clip: open_clip model. "
        "ccip: deepghs' CCIP anime character-identity model (ONNX); clustering then uses its metric and threshold.",
    )
    model: str = Field("ViT-B-32", description="open_clip model name (clip backend).")
    pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag or a local checkpoint path (clip backend)."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: AutoBatch = Field(
        64,
        ge=0,
        le=4096,
        description='Images per forward pass; 0 or "auto": the largest power of two the leased GPU\'s free memory holds (at most 512; 64 on the CPU). CLIP halves it and retries on out-of-memory.',
    )
    num_workers: int = Field(2, ge=0, le=64, description="Decoding threads feeding the model.")
    scene_balance: float = Field(
        1.5,
        ge=0,
        description="offline backend: balance the colours of a shot graded away from neutral (night, dusk) "
        "before describing its layers: the shot's white point (median of its frames' 99th percentiles) "
        "is brought to white where some channel's gain is at least this; 0 turns it off.",
    )
    ccip_model: str = Field(
        "deepghs/ccip_onnx",
        description="ccip backend: a folder with model_feat.onnx, model_metrics.onnx and metrics.json, "
        "or deepghs/ccip_onnx[/<model name>] in the local Hugging Face cache (never downloaded).",
    )
    ccip_threshold: float | None = Field(
        None,
        gt=0,
        lt=2,
        description="ccip backend: same-character difference threshold (None = the model's metrics.json).",
    )


class ClusteringConfig(_Stage):
    """UMAP + HDBSCAN identity clustering."""

    n_neighbors: int = Field(15, ge=2, description="UMAP n_neighbors.")
    n_components: int = Field(10, ge=2, description="UMAP output dimensions.")
    min_dist: float = Field(0.0, ge=0, le=1, description="UMAP min_dist.")
    min_cluster_size: int = Field(5, ge=2, description="HDBSCAN min_cluster_size.")
    min_samples: int | None = Field(3, ge=1, description="HDBSCAN min_samples.")
    reassign_noise: bool = Field(
        False, description="Re-assign noise points to the nearest cluster when close enough."
    )
    reassign_max_distance: float = Field(
        0.25,
        gt=0,
        description="Cosine distance to a cluster centroid below which noise / new layers join it.",
    )
    seed: int = Field(0, description="Random seed (UMAP and ties).")
    link_mode: Literal["hardlink", "copy"] = Field(
        "hardlink", description="How layers are placed in cluster folders."
    )
    pca_dim: int = Field(
        64,
        ge=0,
        description="Project wider embeddings onto this many principal components before UMAP (0 = off); keeps UMAP fast at 100k layers.",
    )
    merge_distance: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Merge clusters whose centroids are within this cosine distance (UMAP can split one character into fragments); 0 = off, None = 0.1 for offline embeddings, 0.05 for CLIP.",
    )
    split_distance: float | None = Field(
        None,
        ge=0,
        lt=2,
        description="Split a cluster whose members form groups farther apart than this mean cosine distance (UMAP can clump small characters together); parts below min_cluster_size become noise. 0 = off, None = 0.25 for offline embeddings, off for CLIP.",
    )
    merge_spread_ratio: float | None = Field(
        None,
        ge=0,
        description="Keep two close clusters apart when their members are this many times farther apart than each cluster's own spread (two characters sharing a palette); 0 = off, None = 2 for offline embeddings, off for CLIP.",
    )
    noise_group_distance: float | None = Field(
        None,
        ge=0,
        lt=2,
        description="Noise layers closer than this mean cosine distance form a cluster of their own when there are noise_group_size of them (a rare character seen a few times); 0 = off, None = 0.15 for offline embeddings, off for CLIP.",
    )
    noise_group_size: int = Field(
        2,
        ge=2,
        description="Fewest noise layers that form a cluster of their own (noise_group_distance): 2, so a character seen in two frames is a cluster rather than noise.",
    )
    n_epochs: int | None = Field(
        None,
        ge=10,
        description="UMAP optimisation epochs (None = UMAP's default: 500 below 10k points, 200 above).",
    )


class AnalysisConfig(_Stage):
    """Cluster quality analysis and tiers."""

    samples_per_cluster: int = Field(
        12, ge=1, le=100, description="Thumbnails per cluster in the HTML report."
    )
    thumbnail_size: int = Field(128, ge=32, le=512, description="Thumbnail longer side in pixels.")
    min_sharpness: float = Field(
        50.0,
        ge=0,
        description="Median Laplacian variance (alpha-masked grey) below which a cluster's quality is poor.",
    )
    min_resolution: int = Field(
        64, ge=0, description="Median longer image side (px) below which a cluster's quality is poor."
    )
    max_duplicate_ratio: float = Field(
        0.6, ge=0, le=1, description="Near-duplicate ratio above which a cluster's quality is poor."
    )
    duplicate_hamming: int = Field(
        10,
        ge=0,
        le=256,
        description="Hamming distance between 256-bit perceptual hashes at or below which two images are near-duplicates.",
    )
    min_type_confidence: float = Field(
        0.6, ge=0.5, le=1, description="Type confidence below which a cluster's type is 'unknown'."
    )
    max_images_per_cluster: int = Field(
        400,
        ge=10,
        description="Images measured per cluster (an even sample of larger clusters; counts use all members).",
    )


class SelectionConfig(_Stage):
    """Which clusters become characters to train."""

    tiers: list[Literal["S", "A", "B", "C", "D"]] = Field(
        default_factory=lambda: ["S", "A", "B", "C"],
        description="Tiers to select. Default S, A, B (the guide's recommended tiers) and C (its 'requires augmentation' tier: 15-20 images, augmented since at most augment.max_original); D (< 15) is left out.",
    )
    min_images: int = Field(0, ge=0, description="Minimum images in a selected cluster.")
    types: list[Literal["human", "yokai", "unknown"]] = Field(
        default_factory=lambda: ["human", "yokai", "unknown"], description="Character types to select."
    )
    clusters: list[int] | None = Field(
        None, description="Explicit cluster ids (overrides the filters when given)."
    )
    names: dict[str, str] = Field(
        default_factory=dict, description="Cluster id -> character name (also the trigger word)."
    )


class ReviewConfig(_Stage):
    """The review web app (``yokai review``)."""

    host: str = Field("127.0.0.1", description="Address to bind; any other than 127.0.0.1 requires a token.")
    port: int = Field(8765, ge=0, le=65535, description="Port to bind (0 = any free port).")
    page_size: int = Field(60, ge=1, le=1000, description="Thumbnails per cluster page.")
    lookalike_distance: float = Field(
        0.35,
        gt=0,
        lt=2,
        description="Centroid cosine distance under which two clusters are flagged as alike.",
    )


class NamingConfig(_Stage):
    """Reference naming (`yokai name`): clusters take the names of matching reference images."""

    max_distance: float | None = Field(
        None,
        gt=0,
        lt=2,
        description="Identity distance within which a reference names a cluster (None = the CCIP threshold "
        "for ccip embeddings, cosine_max_distance otherwise).",
    )
    cosine_max_distance: float = Field(
        0.25, gt=0, lt=2, description="Default cosine-distance threshold for offline / CLIP embeddings."
    )
    representatives: int = Field(
        16, ge=1, le=256, description="Members per cluster compared with the references."
    )
    seed_clusters: bool = Field(
        True,
        description="A reference that names no cluster gathers matching noise layers into a new cluster.",
    )
    min_seed_layers: int = Field(
        2, ge=1, description="Fewest matching noise layers that make a seeded cluster."
    )


class AugmentConfig(_Stage):
    """Augmentation of small clusters."""

    max_original: int = Field(
        30, ge=1, description="Only clusters with at most this many images are augmented."
    )
    min_original: int = Field(5, ge=1, description="Clusters with fewer images are left as they are.")
    intensity: Literal["light", "medium", "heavy"] = Field(
        "medium",
        description="Strength of the transforms (rotation, colour, crop, blur ranges); the multiplier is automatic by image count (the guide's table).",
    )
    allow_flip: bool = Field(
        False,
        description="Allow horizontal flips for every cluster (otherwise only characters marked in symmetric).",
    )
    symmetric: dict[str, bool] = Field(
        default_factory=dict,
        description="Per character (cluster id or character name): true = mirror-symmetric design, horizontal flips allowed (the guide: 'for symmetric characters'); unlisted characters are never flipped, since a flip moves a one-sided mark to the wrong side.",
    )
    blur: bool = Field(True, description="Allow the occasional slight Gaussian blur (guide: optional).")
    seed: int = Field(0, description="Random seed.")


class CaptionConfig(_Stage):
    """Captioning."""

    backend: Literal["offline", "blip2"] = Field(
        "offline", description="offline: template from analysis, no weights. blip2: BLIP-2 model."
    )
    model: str = Field("Salesforce/blip2-opt-6.7b", description="BLIP-2 hub id or local folder.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: int = Field(8, ge=1, le=512, description="Images per generate() call.")
    max_new_tokens: int = Field(40, ge=4, le=200, description="Caption length limit.")
    compile: bool = Field(
        True,
        description="On CUDA: static KV cache with a compiled decode step (about 1.3x faster at batch 64 on an H100; batches are padded to one shape so it compiles once per prompt).",
    )


class TagConfig(_Stage):
    """Booru tags (WD14 v3 taggers) and how captions are composed from them."""

    backend: Literal["offline", "wd14"] = Field(
        "offline",
        description="offline: tags read off the layer itself (colours, framing, background), no weights. wd14: a SmilingWolf v3 tagger.",
    )
    model: str = Field(
        "SmilingWolf/wd-eva02-large-tagger-v3",
        description="WD14 tagger hub id (from the Hugging Face cache, never downloaded) or local folder.",
    )
    runtime: Literal["torch", "onnx"] = Field(
        "torch", description="torch: timm weights (bf16 on CUDA). onnx: the published model.onnx on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (torch runtime).")
    batch_size: AutoBatch = Field(
        64,
        ge=0,
        le=4096,
        description='Images per forward pass; 0 or "auto": the largest power of two the GPU\'s free memory holds (at most 512; 64 on the CPU). Halved and retried on out-of-memory (torch runtime).',
    )
    num_workers: int = Field(4, ge=0, le=64, description="Decode processes feeding the tagger (0 = inline).")
    general_threshold: float = Field(
        0.35, gt=0, lt=1, description="Probability a general tag needs (the wd-tagger space's default)."
    )
    character_threshold: float = Field(
        0.85, gt=0, lt=1, description="Probability a character tag needs (the wd-tagger space's default)."
    )
    general_mcut: bool = Field(
        False, description="Pick the general threshold per image by MCut (largest gap in the sorted scores)."
    )
    character_mcut: bool = Field(
        False, description="Pick the character threshold per image by MCut (never below 0.15)."
    )
    caption: Literal["tags", "sentence", "both"] = Field(
        "tags",
        description="Caption content after the trigger: tags, the captioner's sentence, or tags then sentence.",
    )
    prune_core_tags: bool = Field(
        True,
        description="Leave tags found on most of a character's images out of its captions, so the trigger word learns them.",
    )
    core_tag_ratio: float = Field(
        0.7, gt=0, le=1, description="Share of a character's images a tag must be on to count as core."
    )
    never_prune: list[str] = Field(
        default_factory=lambda: [
            "solo",
            "full_body",
            "upper_body",
            "portrait",
            "simple_background",
            "white_background",
            "transparent_background",
        ],  # fmt: skip
        description="Framing and background tags kept even when core (they vary in use, not in the character).",
    )
    shuffle_caption: bool = Field(
        True,
        description="Tag captions: kohya shuffles the tags each step (keep_tokens keeps the trigger first).",
    )

    @property
    def uses_tags(self) -> bool:
        """Whether captions contain tags (the tag stage must run)."""
        return self.caption in ("tags", "both")


class PackagingConfig(_Stage):
    """kohya dataset packaging."""

    validation_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of images held out for validation."
    )
    auto_params: bool = Field(
        True, description="Pick repeats/epochs/LRs from the guide's table by image count."
    )
    resolution: int = Field(512, ge=64, le=2048, description="Training resolution.")
    alpha_mode: Literal["alpha_mask", "composite"] = Field(
        "alpha_mask",
        description="Keep RGBA with alpha_mask+masked_loss, or composite layers on a flat background.",
    )
    composite_color: tuple[int, int, int] = Field(
        (255, 255, 255), description="Background colour for composite mode."
    )
    base_model: str | None = Field(
        None,
        description="pretrained_model_name_or_path written into training configs; None = the family's default "
        "(sd15: stable-diffusion-v1-5/stable-diffusion-v1-5, sdxl: cagliostrolab/animagine-xl-3.1).",
    )
    multi_concept: bool = Field(
        False, description="Also write one config that trains all selected characters in one LoRA."
    )
    save_every_n_epochs: int = Field(2, ge=1, description="Checkpoint interval.")
    min_resolution: int = Field(
        512,
        ge=0,
        description="Images whose shorter side is below this are too low-resolution (the guide's validation --min-resolution); see low_resolution.",
    )
    low_resolution: Literal["drop", "keep"] = Field(
        "drop",
        description="Images below min_resolution (after any upscale_to): drop = leave them out of the dataset and list them in the packaging summary; keep = package them, validation then reports them and training does not start.",
    )
    upscale_to: int = Field(
        0,
        ge=0,
        description="Lanczos-upscale images whose shorter side is below this to this size, recorded per image in configs/<name>_split.json (0 = never: every image keeps its source resolution and kohya's buckets handle the sizes).",
    )
    batch_size: int = Field(
        1, ge=1, le=64, description="kohya batch size (dataset config) and train_batch_size."
    )
    seed: int = Field(
        0, description="Seed of the validation split (also kohya's validation_seed and training seed)."
    )


class BackgroundConfig(_Stage):
    """Background LoRA data."""

    enabled: bool = Field(True, description="Prepare background LoRA data.")
    repeat_count: int = Field(10, ge=1, description="kohya repeats for the background folder.")
    max_backgrounds: int = Field(500, ge=1, description="Keep at most this many most-diverse backgrounds.")
    similarity_threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity above which two backgrounds are duplicates."
    )
    trigger: str = Field("bg_style", description="Trigger word that starts every background caption.")


class TrainingConfig(_Stage):
    """LoRA training launch."""

    backend: Literal["builtin", "kohya"] = Field(
        "builtin", description="builtin: diffusers+peft trainer. kohya: sd-scripts train_network.py."
    )
    sd_scripts: Path | None = Field(
        None, description="Path to a kohya-ss/sd-scripts checkout (env YOKAI_SD_SCRIPTS)."
    )
    python: Path | None = Field(
        None, description="Python of the sd-scripts environment (env YOKAI_SD_PYTHON)."
    )
    enabled: bool = Field(False, description="Launch training at the end of the pipeline.")
    base_model: str | None = Field(
        None,
        description="Override pretrained_model_name_or_path of every config (hub id, diffusers folder or single file).",
    )
    characters: list[str] | None = Field(
        None, description="Train only these character names (default: every packaged character)."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop each character after this many steps (state is saved; the next run resumes).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (built-in trainer).")
    resolution: int | None = Field(
        None,
        ge=32,
        le=2048,
        description="Built-in trainer: train at this square size without buckets instead of the dataset's resolution (quick CPU smoke runs).",
    )
    evidence: bool = Field(
        True,
        description="After training, sample every checkpoint into trained_models/<name>/evidence/index.html (the grid with the validation-loss curve).",
    )
    # ---- model family (issue 17)
    family: Literal["sd15", "sdxl"] = Field(
        "sd15",
        description="Model family: sd15 (kohya train_network.py, 512 px) or sdxl (sdxl_train_network.py, "
        "1024 px buckets). SDXL anime checkpoints known to work: cagliostrolab/animagine-xl-3.1 (the sdxl "
        "default), Laxhar/noobai-XL-1.0, OnomaAIResearch/Illustrious-xl-early-release-v0 (its single "
        ".safetensors file), Pony Diffusion V6 XL (single file), stabilityai/stable-diffusion-xl-base-1.0.",
    )
    family_per_character: dict[str, Literal["sd15", "sdxl"]] = Field(
        default_factory=dict,
        description="Family by character name where it differs from `family` (e.g. one character on SDXL).",
    )
    sdxl_train_text_encoders: bool = Field(
        False,
        description="SDXL: also train both text encoders (text-encoder outputs are then computed every step, "
        "so captions may be shuffled). Default: UNet only with cached text-encoder outputs, the usual SDXL LoRA.",
    )

    # ---- device leases (issue 14)
    gpus_per_run: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs one character's training uses (kohya: DDP over them; the effective batch is train_batch_size x this, the learning rate is not rescaled). Characters train one per group of this many GPUs.",
    )

    def family_of(self, name: str) -> str:
        """The family one character trains on."""
        return self.family_per_character.get(name, self.family)


class StorageConfig(_Stage):
    """Where the workspace and the episode inbox live."""

    kind: Literal["local", "s3"] = Field("local", description="local folder or S3-compatible object store.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (None = AWS).")
    bucket: str | None = Field(None, description="S3 bucket.")
    prefix: str = Field("", description="Key prefix inside the bucket.")
    region: str | None = Field(None, description="S3 region.")
    credentials_block: str | None = Field(
        None,
        description="Name of a Prefect AwsCredentials block with the S3 keys (None = AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment).",
    )
    max_attempts: int = Field(
        4,
        ge=1,
        le=20,
        description="Attempts per S3 operation before it fails (exponential backoff between them).",
    )
    retry_base_seconds: float = Field(
        1.0, ge=0, le=60, description="First backoff delay between S3 attempts, doubled each time."
    )
    multipart_chunksize_mb: int = Field(
        16, ge=5, le=5120, description="S3 multipart part size and threshold in MiB."
    )
    ingest_stable_seconds: float = Field(
        60.0,
        ge=0,
        description="An inbox video must keep the same size (and mtime/ETag) across scans this far apart before it is ingested.",
    )


class OrchestrationConfig(_Stage):
    """How heavy steps run: in this process, or as deployments on the GPU work pool."""

    distributed: bool = Field(
        False,
        description="Run layering/embedding/captioning/training as deployments on the GPU pool (run_deployment) instead of in-process.",
    )
    deployment_prefix: str = Field("yokai", description="Deployment names are <flow>/<prefix>-<stage>.")
    timeout_seconds: int | None = Field(
        None, ge=1, description="Give up waiting for a GPU deployment run after this long (None = wait)."
    )
    episode_concurrency: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Episodes processed at once by the pipeline and ingest flows (None = the GPUs of this host, 1 without a GPU).",
    )
    chunk_concurrency: int = Field(
        1,
        ge=1,
        le=64,
        description="Layering chunks of one episode run at once on its device (each chunk has its own worker pool and buffers).",
    )
    lease_timeout_seconds: float | None = Field(
        None, gt=0, description="Give up waiting for a free GPU of this host after this long (None = wait)."
    )

    def episodes_at_once(self) -> int:
        """``episode_concurrency``, or the GPUs of this host (1 without a GPU)."""
        from yokai_pipeline.runtime import device_slots

        return self.episode_concurrency or device_slots()


SEEDED_STAGES = ("clustering", "augment", "packaging")


class PipelineConfig(_Stage):
    """The whole pipeline's configuration."""

    seed: int = Field(
        0,
        description="Global seed: the default of clustering.seed, augment.seed and packaging.seed when those are not set.",
    )
    frames: FramesConfig = Field(default_factory=FramesConfig)
    layering: LayeringConfig = Field(default_factory=LayeringConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    tags: TagConfig = Field(default_factory=TagConfig)
    packaging: PackagingConfig = Field(default_factory=PackagingConfig)
    backgrounds: BackgroundConfig = Field(default_factory=BackgroundConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    naming: NamingConfig = Field(default_factory=NamingConfig)
    crops: CropConfig = Field(default_factory=CropConfig)

    @model_validator(mode="before")
    @classmethod
    def _propagate_seed(cls, data: Any) -> Any:
        # An explicit stage seed wins; otherwise the stage inherits the global one.
        if not isinstance(data, dict) or "seed" not in data:
            return data
        data = dict(data)
        for stage in SEEDED_STAGES:
            value = data.get(stage)
            if value is None:
                data[stage] = {"seed": data["seed"]}
            elif isinstance(value, dict):
                data[stage] = {"seed": data["seed"], **value}
            elif isinstance(value, BaseModel) and "seed" not in value.model_fields_set:
                data[stage] = value.model_copy(update={"seed": data["seed"]})
        return data

    @model_validator(mode="after")
    def _check_weights(self) -> PipelineConfig:
        if self.layering.backend in ("u2net", "u2netp", "isnet") and self.layering.weights is None:
            raise ValueError(
                f"layering.backend={self.layering.backend} needs layering.weights (a local .pth or .safetensors file)"
            )
        return self


def load_config(path: str | Path | None) -> PipelineConfig:
    """Load a PipelineConfig from a TOML or JSON file (None = defaults)."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return PipelineConfig.model_validate_json(text)
    import tomllib

    return PipelineConfig.model_validate(tomllib.loads(text))
