"""Launch kohya-ss/sd-scripts ``train_network.py`` (SD 1.5) or ``sdxl_train_network.py`` (SDXL,
recognised by the config's SDXL-only keys) for one character and relay its progress.

The command is an argument list (never a shell string)::

    PYTHON -m accelerate.commands.launch --num_cpu_threads_per_process 1 \\
        SD_SCRIPTS/train_network.py --config_file CONFIG --save_state [--resume STATE_DIR] \\
        [--pretrained_model_name_or_path BASE]

run from the sd-scripts checkout. Output lines go to ``on_line``; tqdm redraws (``\\r``) are
parsed for steps / loss but not relayed, so logs stay readable. ``--save_state`` is always
passed, so an interrupted run leaves a ``<output_name>-*-state`` folder and the next launch
resumes from the newest one. A successful run writes ``<output_dir>/.finished`` (JSON naming
the final checkpoint and the fingerprint of the config and data); a finished character is skipped
until its dataset or config changes.

Where things come from: ``sd_scripts`` argument or ``YOKAI_SD_SCRIPTS``; ``python`` argument or
``YOKAI_SD_PYTHON`` (or ``venv/bin/python`` inside the checkout, kohya's own install layout).
``launcher``: ``accelerate`` (``python -m accelerate.commands.launch``), ``python`` (run the
script directly: one process, no accelerate; what tests use with a stand-in script) or
``auto`` (accelerate when that python can import it, else the script directly).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from yokai_pipeline.errors import ConfigError
from yokai_pipeline.fsio import read_json
from yokai_pipeline.training import (
    FAMILIES,
    TrainingError,
    config_family,
    read_finished_marker,
    read_training_args,
    resolve_config_path,
    training_fingerprint,
    write_finished_marker,
)

ENV_SD_SCRIPTS = "YOKAI_SD_SCRIPTS"
ENV_SD_PYTHON = "YOKAI_SD_PYTHON"
TRAIN_SCRIPT = "train_network.py"
DEFAULT_ACCELERATE_ARGS = ("--num_cpu_threads_per_process", "1")

__all__ = [
    "TrainingError",
    "build_kohya_command",
    "find_resume_state",
    "launch_kohya",
    "parse_progress_line",
    "resolve_sd_python",
    "resolve_sd_scripts",
]

# tqdm bar of train_network.py: "steps:  12%|█▏        | 120/1000 [00:30<03:40,  4.00it/s, avr_loss=0.123]".
# Its validation bars ("validation steps: ...", "epoch validation steps: ...") count other things.
_STEPS = re.compile(r"(?<!validation )\bsteps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
# accelerator.print(f"\nepoch {epoch+1}/{num_train_epochs}\n")
_EPOCH = re.compile(r"\bepoch (\d+)/(\d+)")
_LOSS = re.compile(r"\bavr_loss=([-+0-9.eE]+|nan|inf)")


def parse_progress_line(line: str) -> dict[str, Any]:
    """Steps, epoch and loss found in one line of train_network.py output (empty dict if none)."""
    out: dict[str, Any] = {}
    if m := _STEPS.search(line):
        out["step"], out["total_steps"] = int(m.group(1)), int(m.group(2))
    if m := _EPOCH.search(line):
        out["epoch"], out["total_epochs"] = int(m.group(1)), int(m.group(2))
    if m := _LOSS.search(line):
        try:
            out["loss"] = float(m.group(1))
        except ValueError:
            pass
    return out


def resolve_sd_scripts(sd_scripts: str | Path | None = None) -> Path:
    """The sd-scripts checkout from the argument or ``YOKAI_SD_SCRIPTS``; it must hold train_network.py."""
    value = sd_scripts or os.environ.get(ENV_SD_SCRIPTS)
    if not value:
        raise ConfigError(
            "kohya backend: no sd-scripts checkout configured. Set the environment variable "
            f"{ENV_SD_SCRIPTS}=/path/to/sd-scripts (a clone of https://github.com/kohya-ss/sd-scripts), "
            "or pass --sd-scripts PATH, or set training.sd_scripts in the pipeline config."
        )
    path = Path(value).expanduser().resolve()
    if not (path / TRAIN_SCRIPT).is_file():
        raise ConfigError(
            f"kohya backend: {path} has no {TRAIN_SCRIPT}. Point {ENV_SD_SCRIPTS} (or --sd-scripts, or "
            "training.sd_scripts) at the root of a kohya-ss/sd-scripts checkout."
        )
    return path


def resolve_sd_python(python: str | Path | None, sd_scripts: Path) -> Path:
    """Python of the sd-scripts environment: argument, ``YOKAI_SD_PYTHON``, or the checkout's venv."""
    value = python or os.environ.get(ENV_SD_PYTHON)
    if value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"kohya backend: python {path} does not exist. Set {ENV_SD_PYTHON} (or --python, or "
                "training.python) to the python executable of the environment where sd-scripts' "
                "requirements are installed."
            )
        return path
    for cand in (
        sd_scripts / "venv" / "bin" / "python",
        sd_scripts / ".venv" / "bin" / "python",
        sd_scripts / "venv" / "Scripts" / "python.exe",
    ):
        if cand.is_file():
            return cand
    raise ConfigError(
        f"kohya backend: no python for sd-scripts. Set {ENV_SD_PYTHON}=/path/to/venv/bin/python "
        "(the environment where sd-scripts' requirements are installed), or pass --python PATH, "
        f"or create {sd_scripts / 'venv'}."
    )


def find_resume_state(output_dir: str | Path, output_name: str) -> Path | None:
    """The newest non-empty ``<output_name>-*state`` folder sd-scripts' --save_state wrote, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    pattern = re.compile(re.escape(output_name) + r"(-\d{6}|-step\d{8})?-state$")
    best: tuple[int, float, Path] | None = None
    for d in output_dir.iterdir():
        if not d.is_dir() or not pattern.fullmatch(d.name) or not any(d.iterdir()):
            continue
        step = -1
        ts = d / "train_state.json"
        if ts.is_file():
            try:
                step = int(read_json(ts).get("current_step", -1))
            except (ValueError, TypeError, AttributeError, OSError):
                step = -1
        key = (step, d.stat().st_mtime, d)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def _can_import_accelerate(python: Path) -> bool:
    try:
        done = subprocess.run(
            [str(python), "-c", "import accelerate"], capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def build_kohya_command(
    python: Path,
    sd_scripts: Path,
    config_file: Path,
    *,
    launcher: str = "accelerate",
    base_model: str | None = None,
    resume: Path | None = None,
    accelerate_args: Sequence[str] = DEFAULT_ACCELERATE_ARGS,
    extra_args: Sequence[str] = (),
    script_name: str = TRAIN_SCRIPT,
) -> list[str]:
    """The argument list that runs train_network.py or sdxl_train_network.py (no shell)."""
    script = str(sd_scripts / script_name)
    if launcher == "accelerate":
        cmd = [str(python), "-m", "accelerate.commands.launch", *accelerate_args, script]
    elif launcher == "python":
        cmd = [str(python), script]
    else:
        raise ConfigError(f"launcher must be accelerate, python or auto, got {launcher!r}")
    cmd += ["--config_file", str(config_file), "--save_state"]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if base_model:
        # Command-line values override the config file in sd-scripts (read_config_from_file).
        cmd += ["--pretrained_model_name_or_path", str(base_model)]
    return cmd + list(extra_args)


def _final_checkpoint(output_dir: Path, output_name: str, args: dict[str, Any]) -> Path | None:
    ext = {"ckpt": ".ckpt", "pt": ".pt", "safetensors": ".safetensors"}.get(
        str(args.get("save_model_as", "safetensors")), ".safetensors"
    )
    final = output_dir / f"{output_name}{ext}"
    if final.is_file():
        return final
    cands = sorted(output_dir.glob(f"{output_name}*{ext}"), key=lambda p: p.stat().st_mtime)
    return cands[-1] if cands else None


def launch_kohya(
    config_file: str | Path,
    *,
    sd_scripts: str | Path | None = None,
    python: str | Path | None = None,
    base_model: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    launcher: str = "auto",
    accelerate_args: Sequence[str] = DEFAULT_ACCELERATE_ARGS,
    extra_args: Sequence[str] = (),
    tail_lines: int = 40,
) -> dict[str, Any]:
    """Run sd-scripts' train_network.py on one character's config; resume or skip as needed.

    Args:
        config_file: the character's training-args TOML.
        sd_scripts: sd-scripts checkout (else ``YOKAI_SD_SCRIPTS``).
        python: python of the sd-scripts environment (else ``YOKAI_SD_PYTHON`` / the checkout's venv).
        base_model: overrides ``pretrained_model_name_or_path`` on the command line.
        on_progress: called with ``{step, total_steps, epoch, total_epochs, loss}`` as they change.
        on_line: called with every complete output line (tqdm redraws excluded).
        env: extra environment variables (e.g. ``CUDA_VISIBLE_DEVICES``).
        launcher: ``auto``, ``accelerate`` or ``python`` (see module docstring).
        accelerate_args: options for ``accelerate launch`` placed before the script.
        extra_args: more train_network.py options appended to the command.
        tail_lines: output lines kept for the error message.

    Returns:
        ``{status: finished|skipped, checkpoint, returncode, command, step, epoch, loss, seconds,
        resumed_from}``.

    Raises:
        ConfigError: sd-scripts or its python is not configured (the message says what to set).
        TrainingError: train_network.py exited non-zero (the message has its last output lines).
    """
    config_file = Path(config_file).resolve()
    args = read_training_args(config_file)
    output_name = str(args.get("output_name") or "last")
    output_dir = resolve_config_path(args["output_dir"], config_file) if args.get("output_dir") else None
    script_name = FAMILIES[config_family(args)].kohya_script
    fingerprint = training_fingerprint(config_file)
    if output_dir is not None:
        marker = read_finished_marker(output_dir, fingerprint)
        if marker is not None:
            return {"status": "skipped", "output_dir": str(output_dir), **marker}
        _drop_stale_states(output_dir, output_name)
    sd = resolve_sd_scripts(sd_scripts)
    py = resolve_sd_python(python, sd)
    if launcher == "auto":
        launcher = "accelerate" if _can_import_accelerate(py) else "python"
    resume = find_resume_state(output_dir, output_name) if output_dir is not None else None
    cmd = build_kohya_command(
        py,
        sd,
        config_file,
        launcher=launcher,
        base_model=base_model,
        resume=resume,
        accelerate_args=accelerate_args,
        extra_args=extra_args,
        script_name=script_name,
    )
    run_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if on_line:
        on_line(f"$ {' '.join(cmd)}" + (f"  (resuming from {resume.name})" if resume else ""))

    state: dict[str, Any] = {}
    tail: deque[str] = deque(maxlen=tail_lines)
    t0 = time.time()

    def handle(segment: str, complete: bool) -> None:
        segment = segment.rstrip()
        if not segment:
            return
        found = parse_progress_line(segment)
        if found:
            changed = any(state.get(k) != v for k, v in found.items())
            state.update(found)
            if changed and on_progress:
                on_progress(dict(state))
        if complete:
            tail.append(segment)
            if on_line:
                on_line(segment)

    proc = subprocess.Popen(  # noqa: S603 - argument list, no shell
        cmd,
        cwd=str(sd),
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            buf += chunk
            # tqdm redraws end in \r; complete lines in \n.
            while True:
                m = re.search(rb"[\r\n]", buf)
                if not m:
                    break
                seg, sep, buf = buf[: m.start()], buf[m.start() : m.end()], buf[m.end() :]
                handle(seg.decode("utf-8", "replace"), sep == b"\n")
        if buf:
            handle(buf.decode("utf-8", "replace"), True)
        rc = proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C, task cancelled): stop the trainer; its saved state allows a resume.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    result: dict[str, Any] = {
        "backend": "kohya",
        "command": cmd,
        "returncode": rc,
        "resumed_from": str(resume) if resume else None,
        "seconds": time.time() - t0,
        "output_dir": str(output_dir) if output_dir else None,
        **{k: state.get(k) for k in ("step", "total_steps", "epoch", "total_epochs", "loss")},
    }
    if rc != 0:
        raise TrainingError(
            f"{config_file}: {script_name} exited with code {rc}. Last output:\n" + "\n".join(tail)
        )
    checkpoint = _final_checkpoint(output_dir, output_name, args) if output_dir is not None else None
    if checkpoint is None:
        raise TrainingError(
            f"{config_file}: {script_name} exited 0 but wrote no {output_name} checkpoint in {output_dir}"
        )
    result.update(status="finished", checkpoint=str(checkpoint))
    assert output_dir is not None
    write_finished_marker(
        output_dir,
        {
            "checkpoint": str(checkpoint),
            "backend": "kohya",
            "global_step": state.get("step"),
            "best_epoch": None,
            "fingerprint": fingerprint,
        },
    )
    return result


def _drop_stale_states(output_dir: Path, output_name: str) -> None:
    """A ``.finished`` marker for other data or config: its resume states belong to that old run."""
    if read_finished_marker(output_dir) is None:
        return
    pattern = re.compile(re.escape(output_name) + r"(-\d{6}|-step\d{8})?-state$")
    for d in output_dir.iterdir():
        if d.is_dir() and pattern.fullmatch(d.name):
            shutil.rmtree(d)
    (output_dir / ".finished").unlink(missing_ok=True)
