"""Ingest: new episodes found by content hash, taken once, also on S3 and with overlapping runs."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from yokai_pipeline.errors import BadInputError
from yokai_pipeline.ingest import (
    claim_episode,
    fetch_episode,
    is_done,
    load_registry,
    mark_done,
    release_claim,
    scan_inbox,
)
from yokai_pipeline.storage import LocalStorage

REPO = Path(__file__).resolve().parents[2]


def _video(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _process_all(workspace, episodes) -> list[str]:
    """What the ingest flow does per new episode: claim it, run it, mark it done."""
    ran = []
    for ep in episodes:
        if claim_episode(workspace, ep.sha256, episode_id=ep.episode_id, source=ep.source):
            ran.append(ep.episode_id)
            mark_done(workspace, ep.sha256, ep.episode_id)
    return ran


def test_local_two_new_then_none_and_duplicates_skipped(tmp_path):
    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    a = _video(inbox / "Episode 01.mp4")
    _video(inbox / "season1" / "ep02.MKV")
    (inbox / "notes.txt").write_text("not a video")
    _video(inbox / ".ep03.mp4.part")  # a copy in progress under a temp name

    found = scan_inbox(inbox, state=ws, stable_seconds=0)
    assert sorted(e.episode_id for e in found) == ["Episode_01", "ep02"]
    assert all(e.local_path and Path(e.local_path).is_file() for e in found)
    assert _process_all(ws, found) == [e.episode_id for e in found]

    assert scan_inbox(inbox, state=ws, stable_seconds=0) == []
    # The same content under another name is the same episode.
    (inbox / "copy_of_ep01.webm").write_bytes(a.read_bytes())
    assert scan_inbox(inbox, state=ws, stable_seconds=0) == []

    reg = load_registry(ws)
    assert {r["status"] for r in reg["episodes"].values()} == {"done"}
    assert all(is_done(ws, e.sha256) for e in found)


def test_same_content_twice_in_one_scan_and_id_collision(tmp_path):
    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    a = _video(inbox / "a" / "ep01.mp4")
    (inbox / "b").mkdir()
    (inbox / "b" / "ep01_again.mp4").write_bytes(a.read_bytes())
    _video(inbox / "c" / "ep01.mp4")  # other content, same stem
    found = scan_inbox(inbox, state=ws, stable_seconds=0)
    assert len(found) == 2
    ids = [e.episode_id for e in found]
    assert ids[0] == "ep01" and ids[1].startswith("ep01_") and len(set(ids)) == 2
    # The episode flow names episodes after the file: the renamed one gets a local copy/link.
    videos = [fetch_episode(e, inbox, ws / "ingest" / "videos") for e in found]
    assert videos[0] == inbox / "a" / "ep01.mp4"
    assert videos[1].stem == ids[1] and videos[1].read_bytes() == (inbox / "c" / "ep01.mp4").read_bytes()


def test_file_still_being_written_waits_for_stable_size(tmp_path):
    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    growing = _video(inbox / "ep01.mp4", 1000)
    t0 = 1_000_000.0
    assert scan_inbox(inbox, state=ws, stable_seconds=30, now=t0) == []  # first look: recorded
    with open(growing, "ab") as fh:  # the copy goes on
        fh.write(b"more")
    assert scan_inbox(inbox, state=ws, stable_seconds=30, now=t0 + 40) == []  # size changed: restart
    assert scan_inbox(inbox, state=ws, stable_seconds=30, now=t0 + 50) == []  # only 10 s stable
    found = scan_inbox(inbox, state=ws, stable_seconds=30, now=t0 + 75)
    assert [e.size for e in found] == [1004]


def test_overlapping_claims_exactly_one_wins_local(tmp_path):
    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    _video(inbox / "ep01.mp4")
    # Two overlapping ingest runs both see the episode as new ...
    run1 = scan_inbox(inbox, state=ws, stable_seconds=0)
    run2 = scan_inbox(inbox, state=ws, stable_seconds=0)
    assert len(run1) == len(run2) == 1
    # ... and race to claim it.
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        wins.append(claim_episode(ws, run1[0].sha256, episode_id="ep01"))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert scan_inbox(inbox, state=ws, stable_seconds=0) == []  # claimed, even if not done yet


def test_released_claim_is_offered_again(tmp_path):
    inbox, ws = tmp_path / "inbox", tmp_path / "ws"
    _video(inbox / "ep01.mp4")
    (ep,) = scan_inbox(inbox, state=ws, stable_seconds=0)
    assert claim_episode(ws, ep.sha256)
    release_claim(ws, ep.sha256)  # its run failed
    assert [e.sha256 for e in scan_inbox(inbox, state=ws, stable_seconds=0)] == [ep.sha256]
    assert load_registry(ws)["episodes"][ep.sha256]["status"] == "released"


def test_bad_registry_and_bad_hash_name_the_problem(tmp_path):
    ws = tmp_path / "ws"
    (ws / "ingest").mkdir(parents=True)
    (ws / "ingest" / "registry.json").write_text("{not json")
    with pytest.raises(BadInputError, match="registry.json"):
        load_registry(ws)
    with pytest.raises(BadInputError, match="SHA-256"):
        claim_episode(ws, "../../etc")


def _s3_upload(server, bucket: str, prefix: str, name: str, data: bytes) -> None:
    server.client().put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def test_s3_inbox_two_new_then_none_half_upload_ignored(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    inbox = s3_server.storage(bucket, "inbox")
    workspace = s3_server.storage(bucket, f"ws-{uuid.uuid4().hex[:6]}")
    ep1, ep2 = os.urandom(5000), os.urandom(7000)
    # One through our uploader (records its SHA-256), one as any S3 tool would put it.
    src = tmp_path / "ep01.mp4"
    src.write_bytes(ep1)
    inbox.put_file(src, "ep01.mp4")
    _s3_upload(s3_server, bucket, "inbox", "show/ep02.mkv", ep2)
    # A multipart upload that was started but never completed.
    client = s3_server.client()
    mp = client.create_multipart_upload(Bucket=bucket, Key="inbox/ep03.mp4")
    client.upload_part(
        Bucket=bucket, Key="inbox/ep03.mp4", UploadId=mp["UploadId"], PartNumber=1, Body=b"x" * 1024
    )

    cache = tmp_path / "cache"
    found = scan_inbox(inbox, state=workspace, stable_seconds=0, cache_dir=cache)
    assert sorted(e.episode_id for e in found) == ["ep01", "ep02"]
    by_id = {e.episode_id: e for e in found}
    assert by_id["ep02"].source == f"s3://{bucket}/inbox/show/ep02.mkv"
    assert Path(by_id["ep02"].local_path).read_bytes() == ep2  # downloaded to hash it
    assert by_id["ep01"].local_path is None  # hash read from the upload's metadata
    video = fetch_episode(by_id["ep01"], inbox, tmp_path / "videos")
    assert video.name == "ep01.mp4" and video.read_bytes() == ep1
    assert _process_all(workspace, found) == ["ep01", "ep02"]

    # The same episodes uploaded again (other names): nothing new.
    _s3_upload(s3_server, bucket, "inbox", "again/ep01_reupload.mp4", ep1)
    _s3_upload(s3_server, bucket, "inbox", "again/ep02.mkv", ep2)
    assert scan_inbox(inbox, state=workspace, stable_seconds=0, cache_dir=cache) == []
    reg = json.loads(workspace.get_bytes("ingest/registry.json"))
    assert len(reg["episodes"]) == 2

    # Once the multipart upload completes, the episode shows up.
    part = client.list_parts(Bucket=bucket, Key="inbox/ep03.mp4", UploadId=mp["UploadId"])["Parts"][0]
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="inbox/ep03.mp4",
        UploadId=mp["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    assert [e.episode_id for e in scan_inbox(inbox, state=workspace, stable_seconds=0, cache_dir=cache)] == [
        "ep03"
    ]


def test_s3_stability_needs_two_scans(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    inbox = s3_server.storage(bucket, "inbox")
    ws = LocalStorage(tmp_path / "ws")  # a local workspace with an S3 inbox works too
    _s3_upload(s3_server, bucket, "inbox", "ep01.mp4", os.urandom(3000))
    assert scan_inbox(inbox, state=ws, stable_seconds=60, now=1e9) == []
    _s3_upload(s3_server, bucket, "inbox", "ep01.mp4", os.urandom(4000))  # replaced meanwhile
    assert scan_inbox(inbox, state=ws, stable_seconds=60, now=1e9 + 61) == []
    assert [e.size for e in scan_inbox(inbox, state=ws, stable_seconds=60, now=1e9 + 130)] == [4000]


def test_s3_overlapping_claims_exactly_one_wins(s3_server):
    workspace = s3_server.storage(s3_server.new_bucket(), "ws")
    sha = "ab" * 32
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def race() -> None:
        barrier.wait()
        wins.append(claim_episode(workspace, sha, episode_id="ep01"))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert workspace.exists(f"ingest/claims/{sha}.json")


# --------------------------------------------------------------------------- prefect.yaml


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_parses_as_prefect_project():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig

    raw = _prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)
    by_name = {d.name: d for d in model.deployments}
    expected = {
        "yokai-pipeline": ("flows/pipeline.py:pipeline_flow", "yokai-cpu"),
        "yokai-episode": ("flows/episode.py:episode_flow", "yokai-cpu"),
        "yokai-dataset": ("flows/dataset.py:dataset_flow", "yokai-cpu"),
        "yokai-training": ("flows/training.py:training_flow", "yokai-gpu"),
        "yokai-ingest": ("flows/ingest.py:ingest_flow", "yokai-cpu"),
        "yokai-layering": ("flows/gpu.py:layering_flow", "yokai-gpu"),
        "yokai-embedding": ("flows/gpu.py:embedding_flow", "yokai-gpu"),
        "yokai-caption": ("flows/gpu.py:caption_flow", "yokai-gpu"),
    }
    assert set(by_name) == set(expected)
    for name, (entrypoint, pool) in expected.items():
        dep = by_name[name]
        assert dep.entrypoint == entrypoint, name
        assert dep.work_pool is not None and dep.work_pool.name == pool, name
        assert "yokai" in dep.tags, name
        if pool == "yokai-gpu":
            assert "gpu" in dep.tags, name
        # Child flows called with run_deployment need persisted results.
        assert dep.work_pool.job_variables["env"]["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"

    ingest = by_name["yokai-ingest"]
    (schedule,) = ingest.schedules
    sched = RawScheduleConfig.model_validate(
        schedule.model_dump() if hasattr(schedule, "model_dump") else schedule
    )
    assert sched.interval is not None and sched.interval.total_seconds() == 900
    assert set(ingest.parameters) >= {"inbox", "workspace"}
    # Overlapping scheduled runs are refused by Prefect before they reach the claims.
    assert (
        raw["deployments"][[d["name"] for d in raw["deployments"]].index("yokai-ingest")][
            "concurrency_limit"
        ]["limit"]
        == 1
    )
    pull = raw["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert "YOKAI_REPO_DIR" in pull["directory"]


def test_prefect_yaml_uses_anchors_not_repetition():
    text = (REPO / "prefect.yaml").read_text()
    assert "definitions:" in text
    raw = _prefect_yaml()
    # Every deployment refers to a pool anchor, so the pools are written once.
    assert text.count("work_pool: *") == len(raw["deployments"])
    assert text.count("name: yokai-gpu") == 1 and text.count("name: yokai-cpu") == 1


def test_deployment_templates_are_valid():
    k8s = json.loads((REPO / "deployments" / "k8s" / "gpu-base-job-template.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert set(k8s["variables"]["properties"]) >= {"image", "namespace", "env"}
    docker = yaml.safe_load((REPO / "deployments" / "docker" / "gpu-job-variables.yaml").read_text())
    (request,) = docker["job_variables"]["container_create_kwargs"]["device_requests"]
    assert request["capabilities"] == [["gpu"]] and request["count"] == -1  # leases pick the GPU
