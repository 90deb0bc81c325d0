"""Security: safe weight loading, no shell strings, secrets kept out of errors and logs,
hostile names kept inside the workspace, out of TOML structure and out of HTML markup."""

from __future__ import annotations

import ast
import http.server
import logging
import threading
import tomllib
import traceback
from pathlib import Path

import pytest

from tests.reliability import badfiles as bf
from yokai_pipeline import fsio
from yokai_pipeline.config import AnalysisConfig, PackagingConfig

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("yokai_pipeline", "flows", "tasks", "deployments", "bench")

HOSTILE_NAMES = [
    "../../escape",
    "/etc/passwd",
    "..",
    "a\x00b",
    "C:\\Windows\\evil",
    'kappa"\n[evil]\nx = 1',
    "name]] = 1 #",
    "<script>alert('x')</script>",
    "  ",
]


def _python_files():
    for d in SCANNED:
        if (REPO / d).is_dir():
            yield from sorted((REPO / d).rglob("*.py"))


def _calls():
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(REPO).as_posix(), node


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


# ---------------------------------------------------------------------------- source scans


def test_torch_load_always_weights_only():
    bad = []
    for rel, call in _calls():
        name = _dotted(call.func)
        if name.endswith("torch.load") or name == "load" and rel.endswith("u2net.py"):
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{rel}:{call.lineno}")
        if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
            bad.append(f"{rel}:{call.lineno} {name}")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
                bad.append(f"{rel}:{call.lineno} np.load(allow_pickle=True)")
    assert not bad, "unsafe deserialisation: " + ", ".join(bad)


def test_subprocesses_get_argument_lists_never_a_shell_string():
    bad = []
    spawners = {
        "subprocess.run",
        "subprocess.Popen",
        "subprocess.call",
        "subprocess.check_call",
        "subprocess.check_output",
        "asyncio.create_subprocess_exec",
    }
    for rel, call in _calls():
        name = _dotted(call.func)
        if (
            name
            in (
                "os.system",
                "os.popen",
                "asyncio.create_subprocess_shell",
                "subprocess.getoutput",
                "subprocess.getstatusoutput",
            )
            or name.startswith("os.exec")
            and name.endswith("p")
        ):
            bad.append(f"{rel}:{call.lineno} {name}")
        for kw in call.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                bad.append(f"{rel}:{call.lineno} shell=")
        if (
            name in spawners
            and call.args
            and isinstance(call.args[0], ast.Constant | ast.JoinedStr | ast.BinOp)
        ):
            bad.append(f"{rel}:{call.lineno} {name}(<string>)")
    assert not bad, "shell strings: " + ", ".join(bad)


def test_scans_see_the_code():  # the two scans above must have something to look at
    names = {_dotted(c.func) for _, c in _calls()}
    assert "subprocess.Popen" in names or "subprocess.run" in names
    assert any(n.endswith("torch.load") for n in names)


# ---------------------------------------------------------------------------- credentials

ACCESS_KEY = "AKIAYOKAITESTKEY0042"
SECRET_KEY = "yokaiSecret/0042+DoNotLeak/abcdefghijklmn"


class _Leaky(http.server.BaseHTTPRequestHandler):
    """A hostile S3 endpoint: echoes the request's Authorization header in its error body."""

    def _reply(self):
        auth = self.headers.get("Authorization", "")
        body = (
            "<?xml version='1.0'?><Error><Code>InvalidAccessKeyId</Code>"
            f"<Message>bad key; you sent {auth}</Message><AWSAccessKeyId>{ACCESS_KEY}</AWSAccessKeyId>"
            "</Error>"
        ).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _reply

    def log_message(self, *args):
        pass


def _storage_failures(endpoint: str, tmp_path: Path) -> list:
    """Run failing S3 operations against ``endpoint``; returns the exceptions raised."""
    from yokai_pipeline.storage import S3Storage

    server = None
    if endpoint == "leaky":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Leaky)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
    else:
        url = "http://127.0.0.1:9"  # nothing listens: connection refused, retried, then fails
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 1024)
    errors = []
    try:
        st = S3Storage(
            "bucket",
            "run",
            endpoint_url=url,
            region="us-east-1",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            max_attempts=2,
            retry_base_seconds=0.0,
            botocore_attempts=1,
            connect_timeout=1,
            read_timeout=2,
        )
        errors.append(repr(st))
        for op in (
            lambda: st.put_file(local, "a/f.bin"),
            lambda: st.get_bytes("a/f.bin"),
            lambda: st.list("a/"),
        ):
            with pytest.raises(Exception) as exc:  # noqa: B017 - any error type; its text is what matters
                op()
            errors.append(exc.value)
    finally:
        if server is not None:
            server.shutdown()
    return errors


@pytest.mark.parametrize("endpoint", ["leaky", "closed"])
def test_storage_errors_and_logs_never_contain_credentials(endpoint, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    errors = _storage_failures(endpoint, tmp_path)
    texts = [t for e in errors for t in ((e,) if isinstance(e, str) else (str(e), repr(e)))]
    tracebacks = "".join("".join(traceback.format_exception(e)) for e in errors if not isinstance(e, str))
    ours = [r for r in caplog.records if r.levelno >= logging.INFO or r.name.startswith("yokai")]
    blob = "\n".join([*texts, *(r.getMessage() for r in ours)])
    assert "bucket" in blob  # the errors do say where
    assert SECRET_KEY not in blob and ACCESS_KEY not in blob
    # the secret never goes on the wire, so nothing can echo it back
    assert SECRET_KEY not in tracebacks
    # botocore's own DEBUG dump of request headers (opt-in) carries the key id, never the secret
    assert SECRET_KEY not in caplog.text


def test_storage_error_tracebacks_do_not_carry_the_access_key_id(tmp_path):
    errors = [e for e in _storage_failures("leaky", tmp_path) if not isinstance(e, str)]
    assert ACCESS_KEY not in "".join("".join(traceback.format_exception(e)) for e in errors)


# ---------------------------------------------------------------------------- hostile names


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_character_name_stays_a_plain_folder_name(tmp_path, name):
    from yokai_pipeline.selection import character_name, trigger_word

    for fn in (character_name, trigger_word):
        out = fn(name, 3)
        assert out and "/" not in out and "\\" not in out and "\x00" not in out and out not in (".", "..")
        assert Path(out).name == out and not Path(out).is_absolute()
    assert fsio.safe_name(name) == fsio.safe_name(fsio.safe_name(name))  # idempotent


def _clusters(src: Path, ids: list[int]) -> None:
    for cid in ids:
        d = src / f"cluster_{cid:03d}"
        d.mkdir(parents=True)
        for i in range(4):
            bf.good_png(d / f"l{i}.png", seed=cid * 10 + i)
            (d / f"l{i}.txt").write_text(f"char{cid:03d}, a yokai\n", encoding="utf-8")


def _toml_keys(doc, prefix=""):
    keys = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            keys.add(prefix + k)
            keys |= _toml_keys(v, prefix + k + ".")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            keys |= _toml_keys(v, f"{prefix}[{i}].")
    return keys


def _package(tmp_path: Path, name: str, cluster) -> tuple[Path, dict]:
    from yokai_pipeline.kohya import prepare_training_data

    ws = tmp_path / "ws"
    src = ws / "augmented_clusters"
    _clusters(src, [0])
    out = ws / "training_data" / "characters"
    sel = {"characters": [{"cluster": cluster, "name": name, "trigger": name, "type": "yokai"}]}
    summary = prepare_training_data(
        src, out, sel, PackagingConfig(validation_split=0.0, upscale_to=0, min_resolution=0)
    )
    return out, summary


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_cannot_escape_or_inject_through_packaging(tmp_path, name):
    outside_before = _files_under(tmp_path)
    out, summary = _package(tmp_path, name, 0)
    ws = tmp_path / "ws"
    new = _files_under(tmp_path) - outside_before
    escaped = sorted(str(p) for p in new if p != ws and ws not in p.parents)
    assert new and not escaped, escaped
    folders = [d for d in out.iterdir() if d.is_dir() and d.name != "configs"]
    assert len(folders) == 1
    assert "\x00" not in folders[0].name and ".." not in folders[0].name.split("_", 1)[1:] + [""]

    benign_out, _ = _package(tmp_path / "benign", "kappa", 0)
    for toml in sorted((out / "configs").glob("*.toml")):
        doc = tomllib.loads(toml.read_text(encoding="utf-8"))
        (twin,) = (benign_out / "configs").glob(
            "*_" + toml.name.rsplit("_", 1)[1]
        )  # *_config.toml, *_dataset.toml
        assert _toml_keys(doc) == _toml_keys(tomllib.loads(twin.read_text(encoding="utf-8"))), toml.name
    for txt in folders[0].glob("*.txt"):
        line = txt.read_text(encoding="utf-8")
        assert line.count("\n") == 1 and "\x00" not in line  # one caption line, trigger cannot add lines


@pytest.mark.parametrize("cluster", ["../outside", "/tmp", "..", "cluster_000/../../outside"])
def test_selection_cluster_field_cannot_read_outside_the_source_folder(tmp_path, cluster):
    outside = tmp_path / "ws" / "outside"
    outside.mkdir(parents=True)
    bf.good_png(outside / "secret.png", seed=99)
    out, summary = _package(tmp_path, "kappa", cluster)
    assert not summary.get("characters")
    assert not list(out.rglob("*secret*"))


def test_export_selection_keeps_hostile_names_inside_the_output(tmp_path):
    from yokai_pipeline.selection import export_selection

    clusters = tmp_path / "ws" / "character_clusters"
    _clusters(clusters, [0, 1, 2])
    sel = {
        "version": 1,
        "source": "character_clusters/clusters.json",
        "characters": [
            {"cluster": i, "name": n, "trigger": n, "type": "yokai", "tier": "C", "images": 4}
            for i, n in enumerate(["../../escape", "/etc/passwd", "a\x00b"])
        ],
    }
    out = tmp_path / "ws" / "export"
    before = _files_under(tmp_path)
    try:
        export_selection(sel, clusters, out)
    except Exception as exc:  # a rejected selection is fine; an escape is not
        assert "escape" not in str(type(exc))
    new = _files_under(tmp_path) - before
    assert all(out.resolve() in p.resolve().parents or p.resolve() == out.resolve() for p in new), new


def test_cluster_names_are_escaped_in_the_html_report(tmp_path):
    from yokai_pipeline.analysis import analyze_clusters, render_report

    clusters = tmp_path / "character_clusters"
    _clusters(clusters, [0])
    result = analyze_clusters(clusters, AnalysisConfig())
    html = render_report(result, {0: "<script>alert('x')</script><img src=x onerror=alert(1)>"})
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(" in html
