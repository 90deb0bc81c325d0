"""Every output is written to a temporary name and renamed; completion markers come last."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.reliability import badfiles as bf
from yokai_pipeline import fsio
from yokai_pipeline.config import AugmentConfig, EmbeddingConfig, FramesConfig, LayeringConfig
from yokai_pipeline.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("yokai_pipeline", "flows", "tasks")

WRITE_CALL = re.compile(
    r"open\([^)]*['\"][wax]b?\+?['\"]|\.save\(|imwrite\(|\.write_text\(|\.write_bytes\(|np\.save\(|torch\.save\("
    r"|save_file\(|shutil\.copy|os\.link\(|\.tofile\(|json\.dump\(|os\.fdopen\([^)]*['\"]w"
)

#: (file, text on the line) -> why this direct write is safe. Anything else must go through fsio.
ALLOWED_WRITES = {
    ("yokai_pipeline/analysis.py", "im.save(buf"): "in-memory buffer",
    ("yokai_pipeline/augmentation.py", '.save(buf, format="PNG"'): "in-memory buffer",
    ("yokai_pipeline/augmentation.py", "os.link(src, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/augmentation.py", "shutil.copyfile(src, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/backgrounds.py", ".save(buf, format="): "in-memory buffer",
    ("yokai_pipeline/kohya.py", "image.save(buf"): "in-memory buffer",
    ("yokai_pipeline/selection.py", "os.link(src, tmp)"): "temp name, then os.replace",
    ("yokai_pipeline/selection.py", "shutil.copyfile(src, t)"): "inside fsio.atomic_path",
    ("yokai_pipeline/selection.py", "self.save(args)"): "interactive command, not a file write",
    ("yokai_pipeline/storage.py", "shutil.copyfile(local, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/storage.py", "shutil.copyfile(src, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/storage.py", 'os.fdopen(fd, "wb")'): "O_EXCL claim marker (create_exclusive)",
    ("yokai_pipeline/ingest.py", "os.link(episode.local_path, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/ingest.py", "shutil.copyfile(episode.local_path, tmp)"): "inside fsio.atomic_path",
    ("yokai_pipeline/embedding.py", 'open(tmp, "wb")'): "inside fsio.atomic_path",
    ("yokai_pipeline/embedding.py", "np.save(fh"): "inside fsio.atomic_path",
    ("yokai_pipeline/clustering.py", "os.link(src, dest)"): "into a .tmp- build folder swapped in whole",
    ("yokai_pipeline/clustering.py", "shutil.copy2(src, dest)"): "into a .tmp- build folder swapped in whole",
    ("yokai_pipeline/training/loop.py", "torch.save(obj.state_dict(), buf)"): "in-memory buffer",
    (
        "yokai_pipeline/training/tiny.py",
        '/ "vocab.json").write_text',
    ): "TemporaryDirectory (tiny test tokenizer)",
    (
        "yokai_pipeline/training/tiny.py",
        '/ "merges.txt").write_text',
    ): "TemporaryDirectory (tiny test tokenizer)",
    ("yokai_pipeline/models/u2net.py", "save_file(state, str(tmp)"): "inside fsio.atomic_path",
}


def _source_files():
    for d in SOURCE_DIRS:
        yield from sorted((REPO / d).rglob("*.py"))


def test_no_direct_file_writes_outside_fsio():
    unexplained = []
    for path in _source_files():
        rel = path.relative_to(REPO).as_posix()
        if rel == "yokai_pipeline/fsio.py":
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if not WRITE_CALL.search(code):
                continue
            if not any(f == rel and text in code for f, text in ALLOWED_WRITES):
                unexplained.append(f"{rel}:{lineno}: {line.strip()}")
    assert not unexplained, "write through yokai_pipeline.fsio (or explain in ALLOWED_WRITES):\n" + "\n".join(
        unexplained
    )


def test_allow_list_has_no_dead_entries():
    """An entry whose line is gone would hide a future raw write under an old excuse."""
    sources = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in _source_files()}
    dead = [k for k in ALLOWED_WRITES if k[1] not in sources.get(k[0], "")]
    assert not dead


def test_atomic_write_never_exposes_a_partial_file(tmp_path):
    """A writer killed with SIGKILL mid-write leaves the old complete file or the new one."""
    dest = tmp_path / "big.bin"
    size = 8 << 20
    script = (
        "import sys; from yokai_pipeline import fsio\n"
        "i = 0\n"
        "while True:\n"
        f"    fsio.atomic_write_bytes(sys.argv[1], bytes([i % 251]) * {size}); i += 1\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script, str(dest)], env=env)
        seen = 0
        while not dest.exists():  # the child is still importing
            assert proc.poll() is None
            time.sleep(0.01)
        t0 = time.monotonic()
        while time.monotonic() - t0 < delay:
            if dest.exists():
                data = dest.read_bytes()
                assert len(data) == size and data.count(data[:1]) == size  # complete, one version
                seen += 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = dest.read_bytes()
        assert len(data) == size and data.count(data[:1]) == size
    # the killed writers' temp files are recognised as stale and removed
    assert fsio.remove_stale_temps(tmp_path) >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


class _ReplaceLog:
    """Records the destination of every os.replace (the publish step of fsio.atomic_path)."""

    def __init__(self, monkeypatch):
        self.order: list[Path] = []
        self._lock = threading.Lock()
        real = os.replace

        def replace(src, dst, *a, **k):
            real(src, dst, *a, **k)
            with self._lock:
                self.order.append(Path(dst).resolve())

        monkeypatch.setattr(os, "replace", replace)

    def index(self, path: Path) -> int:
        return self.order.index(Path(path).resolve())


def test_completion_markers_are_published_after_the_outputs(tmp_path, monkeypatch):
    from yokai_pipeline.augmentation import augment_cluster
    from yokai_pipeline.embedding import embed_layers, sidecar_path
    from yokai_pipeline.frames import extract_frames
    from yokai_pipeline.layering import segment_layers, write_layer_manifest

    log = _ReplaceLog(monkeypatch)
    ws = Workspace(tmp_path / "ws")
    extract_frames(bf.good_video(tmp_path / "ep.mp4"), ws, FramesConfig())
    marker = log.index(ws.episode_dir("ep") / "extract.json")
    rows = fsio.read_jsonl(ws.frames_manifest("ep"))
    for r in rows:
        assert log.index(ws.abs(r["path"])) < marker
    assert log.index(ws.frames_manifest("ep")) < marker

    layers = segment_layers(rows, ws, LayeringConfig(num_workers=2))
    write_layer_manifest(ws, "ep", layers)
    for bg in (r for r in layers if r["kind"] == "background"):
        mask = log.index(ws.abs(bg["mask_path"]))  # the per-frame marker
        stem = Path(bg["path"]).stem
        for r in layers:
            if Path(r["path"]).stem.startswith(stem):
                assert log.index(ws.abs(r["path"])) < mask or r["path"] == bg["mask_path"]
    assert all(log.index(ws.abs(r["path"])) < log.index(ws.layers_manifest("ep")) for r in layers)

    embed_layers(ws, "ep", EmbeddingConfig(num_workers=1))
    assert log.index(ws.embeddings_path("ep")) < log.index(sidecar_path(ws, "ep"))

    src = tmp_path / "cluster_000"
    src.mkdir()
    for i in range(6):
        bf.good_png(src / f"img{i}.png", seed=i)
    out = tmp_path / "aug" / "cluster_000"
    augment_cluster(src, out, AugmentConfig())
    summary = log.index(out / "augment_summary.json")
    written = [p for p in out.iterdir() if p.name != "augment_summary.json"]
    assert written and all(log.index(p) < summary for p in written if p.suffix == ".png" and "_aug" in p.name)


def test_file_lock_serialises_holders(tmp_path):
    lock = tmp_path / "locks" / "episode.lock"
    inside, overlaps = [], []

    def hold(i: int) -> None:
        with fsio.file_lock(lock):
            if inside:
                overlaps.append(i)
            inside.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    with fsio.file_lock(lock), pytest.raises(TimeoutError, match="still locked"):
        with fsio.file_lock(lock, timeout=0.2):
            pass


def test_stage_sources_parse():  # guards the scans above against reading nothing
    files = list(_source_files())
    assert len(files) > 20
    for p in files:
        ast.parse(p.read_text(encoding="utf-8"))
