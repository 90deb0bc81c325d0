"""Captions: trigger prefix, never empty, resume, bad images, offline template, tiny BLIP-2 end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from yokai_pipeline.captioning import (
    PROMPTS,
    Blip2Captioner,
    OfflineCaptioner,
    caption_clusters,
    caption_folder,
    colour_names,
    describe_offline,
    format_caption,
    get_captioner,
    prompt_for,
    silhouette_cues,
)
from yokai_pipeline.config import CaptionConfig
from yokai_pipeline.synthetic import CHARACTERS, render_character

OFFLINE = CaptionConfig(backend="offline", batch_size=3)


def _char(name: str):
    return next(c for c in CHARACTERS if c.name == name)


def _folder(tmp_path, name="cluster_003", chars=("nyan",), n=4):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for k in range(n):
        c = _char(chars[k % len(chars)])
        a = render_character(c.id, facing=1 if k % 2 == 0 else -1, pose=k / 5)
        Image.fromarray(np.pad(a, ((6, 6), (6, 6), (0, 0))), "RGBA").save(folder / f"img{k:02d}.png")
    return folder


class Recording:
    """A captioner that returns fixed texts and remembers what it was asked."""

    name = "recording"

    def __init__(self, text="a test description"):
        self.text, self.calls = text, []

    def caption(self, images, prompts):
        self.calls.append((len(images), list(prompts), [im.mode for im in images]))
        return [self.text(i) if callable(self.text) else self.text for i in range(len(images))]


def test_prompts_are_type_specific():
    human, yokai = prompt_for("human"), prompt_for("yokai")
    for word in ("hair", "clothing", "expression", "pose"):
        assert word in human
    for word in ("colours", "shape", "distinctive features"):
        assert word in yokai
    assert prompt_for("something else") == PROMPTS["unknown"]
    assert all(p.startswith("Question:") and p.endswith("Answer:") for p in PROMPTS.values())


@pytest.mark.parametrize("text", ["", "   ", "\n", ",.", None, "Answer: "])
def test_format_caption_never_empty(text):
    cap = format_caption("char007", text, "yokai")
    assert cap.startswith("char007, ") and "yokai" in cap
    assert any(ch.isalnum() for ch in cap[len("char007, ") :])


def test_format_caption_cleans_model_output():
    assert format_caption("nyan", "  Answer: a red cat\nwith a tail. ") == "nyan, a red cat with a tail"
    assert format_caption("nyan", "nyan, a red cat") == "nyan, a red cat"


def test_offline_description_reads_colours_shape_and_facing():
    nyan = _char("nyan")  # red body, not symmetric: faces where its head leans
    right = render_character(nyan.id, facing=1)
    left = render_character(nyan.id, facing=-1)
    assert colour_names(right)[0] == "red"
    assert silhouette_cues(right)["facing"] == "right" and silhouette_cues(left)["facing"] == "left"
    text = describe_offline(Image.fromarray(left), "yokai")
    assert text.startswith("a red") and "yokai" in text and "facing left" in text
    keita = render_character(_char("keita").id)
    assert "tall slender figure" in describe_offline(Image.fromarray(keita), "human")
    assert "blue" in colour_names(render_character(_char("sakana").id))


def test_caption_folder_writes_trigger_prefixed_captions(tmp_path):
    folder = _folder(tmp_path, n=5)
    res = caption_folder(folder, OFFLINE, trigger="nyan", char_type="yokai")
    assert res["captioned"] == 5 and res["skipped"] == 0 and res["failed"] == []
    assert res["images_per_s"] > 0
    for img in folder.glob("*.png"):
        cap = img.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert cap.startswith("nyan, a red") and "yokai" in cap
    assert not list(folder.glob(".tmp-*"))


def test_resume_skips_captioned_images(tmp_path):
    folder = _folder(tmp_path, n=5)
    (folder / "img00.txt").write_text("nyan, hand written caption\n")
    (folder / "img01.txt").write_text("  \n")  # empty: must be redone
    rec = Recording()
    res = caption_folder(folder, OFFLINE, trigger="nyan", char_type="yokai", captioner=rec)
    assert res["skipped"] == 1 and res["captioned"] == 4
    assert sum(n for n, _, _ in rec.calls) == 4
    assert (folder / "img00.txt").read_text() == "nyan, hand written caption\n"
    assert (folder / "img01.txt").read_text().strip() == "nyan, a test description"
    again = caption_folder(folder, OFFLINE, trigger="nyan", char_type="yokai", captioner=rec)
    assert again["skipped"] == 5 and again["captioned"] == 0 and sum(n for n, _, _ in rec.calls) == 4


def test_empty_model_output_gets_fallback_caption(tmp_path):
    folder = _folder(tmp_path, n=4)
    res = caption_folder(folder, OFFLINE, trigger="char003", char_type="yokai", captioner=Recording(text=""))
    assert res["captioned"] == 4 and res["fallback"] == 4
    for img in folder.glob("*.png"):
        cap = img.with_suffix(".txt").read_text().strip()
        assert cap.startswith("char003, ") and len(cap) > len("char003, ") + 3


def test_bad_image_reported_and_rest_captioned(tmp_path):
    folder = _folder(tmp_path, n=4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    res = caption_folder(folder, OFFLINE, trigger="char003", char_type="yokai")
    assert res["captioned"] == 4
    assert [f["name"] for f in res["failed"]] == ["broken.png"] and "unreadable" in res["failed"][0][
        "problem"
    ]
    assert not (folder / "broken.txt").exists()


def test_failing_batch_reported_and_other_batches_captioned(tmp_path):
    folder = _folder(tmp_path, n=7)

    class Flaky(Recording):
        def caption(self, images, prompts):
            if not self.calls:
                self.calls.append("boom")
                raise RuntimeError("CUDA out of memory")
            return super().caption(images, prompts)

    res = caption_folder(folder, OFFLINE, trigger="x", char_type="human", captioner=Flaky())
    assert res["captioned"] == 4 and len(res["failed"]) == 3  # first batch of 3 failed
    assert all("out of memory" in f["problem"] for f in res["failed"])
    # The next run retries exactly those.
    res2 = caption_folder(folder, OFFLINE, trigger="x", char_type="human", captioner=Recording())
    assert res2["captioned"] == 3 and res2["skipped"] == 4


def test_caption_clusters_uses_selection_trigger_and_type(tmp_path):
    root = tmp_path / "augmented_clusters"
    _folder(root, "cluster_000", ("keita",), 2)
    _folder(root, "cluster_003", ("nyan",), 2)
    _folder(root, "cluster_005", ("medama",), 2)
    selection = {
        "version": 1,
        "characters": [
            {"cluster": 0, "name": "keita", "trigger": "keita", "type": "human"},
            {"cluster": 3, "name": "nyan", "trigger": "nyan", "type": "yokai"},
        ],
    }
    rec = Recording()
    summary = caption_clusters(root, OFFLINE, selection=selection, captioner=rec)
    assert summary["folders"] == 2 and summary["captioned"] == 4
    assert not list((root / "cluster_005").glob("*.txt"))  # not selected
    assert (root / "cluster_000" / "img00.txt").read_text().startswith("keita, ")
    assert [c[1][0] for c in rec.calls] == [PROMPTS["human"], PROMPTS["yokai"]]
    # Without a selection: trigger char<id>, type from the analysis, images handed over as RGBA.
    rec2 = Recording()
    analysis = {"clusters": [{"id": 5, "folder": "cluster_005", "type": "yokai"}]}
    caption_clusters(root, OFFLINE, analysis=analysis, captioner=rec2)
    assert (root / "cluster_005" / "img00.txt").read_text().startswith("char005, ")
    assert rec2.calls == [(2, [PROMPTS["yokai"]] * 2, ["RGBA", "RGBA"])]


def test_offline_backend_from_config():
    assert isinstance(get_captioner(OFFLINE), OfflineCaptioner)
    assert isinstance(get_captioner(CaptionConfig(backend="blip2", model="/nonexistent")), Blip2Captioner)


# --- tiny random BLIP-2, saved and loaded back like a downloaded checkpoint -------------------


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from yokai_pipeline.models.blip2 import build_random_blip2, clear_cache, save_bundle

    folder = tmp_path_factory.mktemp("blip2_tiny")
    save_bundle(build_random_blip2("tiny", device="cpu", seed=0), folder)
    yield folder
    clear_cache()


def test_load_blip2_from_local_folder_is_memoised(tiny_blip2):
    import torch

    from yokai_pipeline.models.blip2 import load_blip2

    a = load_blip2(str(tiny_blip2), "cpu")
    b = load_blip2(str(tiny_blip2), "cpu")
    assert a is b
    assert a.dtype == torch.float32 and a.processor.tokenizer.padding_side == "left"
    assert not a.model.training


def test_blip2_batched_generation_matches_single(tiny_blip2):
    from yokai_pipeline.models.blip2 import load_blip2

    cap = Blip2Captioner(str(tiny_blip2), "cpu", max_new_tokens=6, bundle=load_blip2(str(tiny_blip2), "cpu"))
    ims = [Image.fromarray(render_character(c.id)) for c in CHARACTERS[:3]]
    prompts = [
        PROMPTS["human"],
        PROMPTS["yokai"],
        "Question: what? Answer:",
    ]  # different lengths: left padding
    batched = cap.caption(ims, prompts)
    single = [cap.caption([im], [p])[0] for im, p in zip(ims, prompts, strict=True)]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_tiny_blip2_end_to_end_through_caption_folder(tiny_blip2, tmp_path):
    folder = _folder(tmp_path, "cluster_003", ("nyan", "kappa"), 5)
    cfg = CaptionConfig(backend="blip2", model=str(tiny_blip2), device="cpu", batch_size=2, max_new_tokens=8)
    res = caption_folder(folder, cfg, trigger="nyan", char_type="yokai")
    assert res["captioned"] == 5 and res["failed"] == []
    for img in sorted(folder.glob("*.png")):
        cap = img.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert cap.startswith("nyan, ") and len(cap) > len("nyan, ")
        assert "Question" not in cap  # the prompt is not echoed into the caption
    again = caption_folder(folder, cfg, trigger="nyan", char_type="yokai")
    assert again["skipped"] == 5 and again["captioned"] == 0


def test_static_cache_path_pads_short_batches_to_one_shape(tiny_blip2, monkeypatch):
    from yokai_pipeline.models.blip2 import load_blip2

    bundle = load_blip2(str(tiny_blip2), "cpu")
    eager = Blip2Captioner("x", "cpu", max_new_tokens=5, bundle=bundle)
    static = Blip2Captioner("x", "cpu", max_new_tokens=5, compile=True, batch_size=4, bundle=bundle)
    assert not static.static  # compiled decoding is a CUDA path
    monkeypatch.setattr(Blip2Captioner, "static", property(lambda self: self.compile))
    ims = [Image.fromarray(render_character(c.id)) for c in CHARACTERS[:3]]
    batch = static.prepare(ims, [PROMPTS["yokai"]] * 3)
    assert batch["n"] == 3 and batch["inputs"]["pixel_values"].shape[0] == 4
    texts = static.generate(batch)
    assert texts == eager.caption(ims, [PROMPTS["yokai"]] * 3)


def test_device_preprocess_path_gives_the_same_captions(tiny_blip2):
    from yokai_pipeline.models.blip2 import load_blip2

    bundle = load_blip2(str(tiny_blip2), "cpu")
    cpu = Blip2Captioner("x", "cpu", max_new_tokens=5, bundle=bundle)
    dev = Blip2Captioner("x", "cpu", max_new_tokens=5, device_preprocess=True, bundle=bundle)
    assert not cpu.device_preprocess and dev.device_preprocess
    ims = [Image.fromarray(render_character(c.id)) for c in CHARACTERS[3:6]]
    batch = dev.prepare(ims, [PROMPTS["human"]] * 3)
    assert "inputs" not in batch  # the CPU thread only composited; the processor runs next to the model
    assert dev.generate(batch) == cpu.caption(ims, [PROMPTS["human"]] * 3)


def test_parallel_folders_share_one_model_safely(tiny_blip2, tmp_path):
    """Prefect maps caption tasks on threads; they share the memoised model."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = CaptionConfig(backend="blip2", model=str(tiny_blip2), device="cpu", batch_size=2, max_new_tokens=6)
    a = _folder(tmp_path / "par", "cluster_000", ("keita",), 4)
    b = _folder(tmp_path / "par", "cluster_003", ("nyan",), 4)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda f: caption_folder(f, cfg, trigger=f.name, char_type="yokai"), [a, b]))
    assert [r["captioned"] for r in results] == [4, 4]
    parallel = {p: p.read_text() for p in sorted((tmp_path / "par").rglob("*.txt"))}
    for p in parallel:
        p.unlink()
    for f in (a, b):
        caption_folder(f, cfg, trigger=f.name, char_type="yokai")
    assert parallel == {p: p.read_text() for p in sorted((tmp_path / "par").rglob("*.txt"))}


def test_blip2_out_of_memory_halves_the_batch_and_gives_the_same_captions(tiny_blip2, caplog):
    import torch

    from yokai_pipeline.models.blip2 import load_blip2

    bundle = load_blip2(str(tiny_blip2), "cpu")
    ims = [Image.fromarray(render_character(c.id)) for c in CHARACTERS[:4]]
    prompts = [PROMPTS["yokai"]] * 4
    want = Blip2Captioner("x", "cpu", max_new_tokens=5, bundle=bundle).caption(ims, prompts)
    cap = Blip2Captioner("x", "cpu", max_new_tokens=5, bundle=bundle)
    real, calls = bundle.model.generate, []

    def small_device(**kw):
        calls.append(kw["pixel_values"].shape[0])
        if calls[-1] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(**kw)

    bundle.model.generate = small_device
    try:
        got = cap.caption(ims, prompts)
        again = cap.caption(ims[:2], prompts[:2])
    finally:
        bundle.model.generate = real  # the bundle is memoised per process
    assert got == want and again == want[:2]
    assert calls[:3] == [4, 2, 1] and cap._budget.size == 1
    assert calls[-2:] == [1, 1], "the smaller size stays for the run"
    assert "out of memory" in caplog.text
