"""Create what the Yokai deployments need on a Prefect server; safe to run again.

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/setup.py --gpus 2

- work pools ``yokai-cpu`` and ``yokai-gpu`` (process type; left alone if they already exist,
  whatever their type, so a pool switched to kubernetes/docker by hand is not overwritten),
- a global concurrency limit ``gpu`` with one slot per GPU (flows take a slot with
  ``prefect.concurrency.sync.concurrency("gpu")``) and a tag concurrency limit ``gpu`` with the
  same number of slots (for tasks tagged ``gpu``); existing limits are set to ``--gpus``,
- optionally a ``LocalFileSystem`` block for shared result storage (``--results-path``),
- optionally, only if ``prefect-aws`` is installed, an ``AwsCredentials`` block and an
  ``S3Bucket`` block for result storage on S3 (``--s3-bucket``); the keys are read from
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` and never printed.
"""

from __future__ import annotations

import os
from typing import Any

import typer

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])

CPU_POOL = "yokai-cpu"
GPU_POOL = "yokai-gpu"
GPU_LIMIT = "gpu"


def ensure_work_pool(client: Any, name: str, description: str, concurrency_limit: int | None = None) -> str:
    """Create a process work pool unless one with that name exists; returns what was done."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                description=description,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit,
            )
        )
        return f"work pool {name}: created (process)"
    if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
        return f"work pool {name}: exists ({pool.type}), concurrency limit set to {concurrency_limit}"
    return f"work pool {name}: exists ({pool.type})"


def ensure_global_limit(client: Any, name: str, slots: int) -> str:
    """Create or resize a global concurrency limit."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        current = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        return f"global concurrency limit {name}: created with {slots} slot(s)"
    if current.limit != slots or not current.active:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
        return f"global concurrency limit {name}: set to {slots} slot(s) (was {current.limit})"
    return f"global concurrency limit {name}: exists with {slots} slot(s)"


def ensure_tag_limit(client: Any, tag: str, slots: int) -> str:
    """Create or resize the concurrency limit of a task tag (the API upserts by tag)."""
    from prefect.exceptions import ObjectNotFound

    try:
        before = client.read_concurrency_limit_by_tag(tag).concurrency_limit
    except ObjectNotFound:
        before = None
    if before == slots:
        return f"tag concurrency limit {tag}: exists with {slots} slot(s)"
    client.create_concurrency_limit(tag=tag, concurrency_limit=slots)
    return f"tag concurrency limit {tag}: {'created with' if before is None else 'set to'} {slots} slot(s)"


def ensure_local_results_block(path: str, name: str) -> str:
    """A LocalFileSystem block for results on a folder all workers share (NFS, ...)."""
    from prefect.filesystems import LocalFileSystem

    LocalFileSystem(basepath=os.path.abspath(path)).save(name, overwrite=True)
    return f"block local-file-system/{name}: saved ({os.path.abspath(path)})"


def ensure_s3_blocks(
    bucket: str, prefix: str, endpoint_url: str | None, region: str | None, name: str
) -> str:
    """AwsCredentials + S3Bucket blocks, only if prefect-aws is installed."""
    try:
        from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
    except ImportError:
        return (
            "S3 blocks: skipped (prefect-aws is not installed; pip install prefect-aws==0.7.12 to store "
            "Prefect results on S3). The pipeline's own S3 storage works without it."
        )
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        return "S3 blocks: skipped (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    creds = AwsCredentials(
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url)
        if endpoint_url
        else AwsClientParameters(),
    )
    creds.save(f"{name}-credentials", overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=prefix, credentials=creds).save(name, overwrite=True)
    return f"blocks aws-credentials/{name}-credentials and s3-bucket/{name}: saved (s3://{bucket}/{prefix})"


@app.command()
def main(
    gpus: int = typer.Option(
        1, min=0, help="GPUs in the whole cluster: slots of the `gpu` concurrency limit."
    ),
    cpu_pool: str = typer.Option(CPU_POOL, help="Work pool for CPU flows."),
    gpu_pool: str = typer.Option(GPU_POOL, help="Work pool for GPU flows."),
    limit_gpu_pool: bool = typer.Option(
        False,
        help="Also cap concurrent flow runs of the GPU pool at --gpus (each GPU flow uses one GPU).",
    ),
    results_path: str | None = typer.Option(
        None, help="Shared folder for Prefect results (LocalFileSystem block)."
    ),
    results_block: str = typer.Option("yokai-results", help="Name of the result storage block."),
    s3_bucket: str | None = typer.Option(None, help="Bucket for Prefect results (needs prefect-aws)."),
    s3_prefix: str = typer.Option("prefect-results", help="Folder in the bucket for Prefect results."),
    s3_endpoint: str | None = typer.Option(None, help="S3 endpoint URL (None = AWS)."),
    s3_region: str | None = typer.Option(None, help="S3 region."),
) -> None:
    """Create the work pools, the `gpu` concurrency limits and the optional blocks."""
    from prefect.client.orchestration import get_client

    lines = []
    with get_client(sync_client=True) as client:
        lines.append(
            ensure_work_pool(client, cpu_pool, "Yokai CPU flows: pipeline, episodes, dataset, ingest.")
        )
        lines.append(
            ensure_work_pool(
                client,
                gpu_pool,
                "Yokai GPU flows: layering, embedding, captioning, training.",
                concurrency_limit=gpus if limit_gpu_pool else None,
            )
        )
        lines.append(ensure_global_limit(client, GPU_LIMIT, gpus))
        lines.append(ensure_tag_limit(client, GPU_LIMIT, gpus))
    if results_path:
        lines.append(ensure_local_results_block(results_path, results_block))
    if s3_bucket:
        lines.append(ensure_s3_blocks(s3_bucket, s3_prefix, s3_endpoint, s3_region, results_block))
    for line in lines:
        typer.echo(line)


if __name__ == "__main__":
    app()
