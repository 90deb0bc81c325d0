"""`yokai select`: choose the clusters to train, batch (filters) or interactive (terminal browser)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperCommand

from yokai_pipeline.config import SelectionConfig, load_config
from yokai_pipeline.errors import YokaiError

console = Console(stderr=True)

MULTI_VALUE_OPTIONS = ("--tiers", "--types", "--clusters", "--name")


def expand_multi_values(args: list[str], options: tuple[str, ...] = MULTI_VALUE_OPTIONS) -> list[str]:
    """Rewrite ``--tiers S A`` as ``--tiers S --tiers A``.

    The guide writes several values after one flag; click takes one value per flag.
    """
    out: list[str] = []
    current: str | None = None
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        if arg in options:
            current = arg
            out.append(arg)
            continue
        is_option = arg.startswith("-") and not arg.lstrip("-").isdigit() and arg != "-"
        if is_option:
            current = None
        elif current is not None and out and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


class MultiValueCommand(TyperCommand):
    """A command whose list options take several values after one flag."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_values(list(args)))


def _parse_names(items: list[str]) -> dict[str, str]:
    names = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isdigit() or not value.strip():
            raise typer.BadParameter(f"{item!r} is not ID=NAME (e.g. 3=Jibanyan)", param_hint="--name")
        names[str(int(key))] = value.strip()
    return names


def _review_attributes(ws: Any) -> dict[int, dict[str, Any]]:
    """The live edit log's per-cluster choices; warns when the reviewed tree is older than the log."""
    from yokai_pipeline import edits

    if not (ws.character_clusters / "clusters.json").is_file():
        return {}
    if not edits.reviewed_is_current(ws):
        console.print(
            "[yellow]the review edits changed since the last dataset run: names, training "
            "choices and exclusions apply now; run the dataset flow to re-analyse merged "
            "or split clusters[/yellow]"
        )
    return edits.current_attributes(ws)


def _interactive(
    result: dict, clusters: Path, cfg: SelectionConfig, attrs: dict, **session: Any
) -> dict[str, Any]:
    """The terminal session, starting from review's choices; review's trigger words kept.

    The clusters review marked for training start selected under review's names; the person
    can still change anything. A cluster left with its review name keeps its review trigger.
    """
    from yokai_pipeline import edits, selection

    names = {int(k): v for k, v in cfg.names.items()}
    if attrs:
        start = edits.select_with_edits(result, cfg.model_copy(update={"clusters": []}), attrs)
        names = {**{int(ch["cluster"]): ch["name"] for ch in start["characters"]}, **names}
    sel = selection.interactive_select(result, clusters, names=names, **session)
    display = edits.display_names(attrs)
    for ch in sel["characters"]:
        trigger = attrs.get(ch["cluster"], {}).get("trigger")
        if trigger and ch["name"] == selection.character_name(display.get(ch["cluster"], ""), ch["cluster"]):
            ch["trigger"] = selection.trigger_word(trigger, ch["cluster"])
    return sel


def select(
    clusters: Annotated[Path, typer.Argument(help="The character_clusters folder.")],
    analysis_file: Annotated[
        Path | None,
        typer.Option(
            "--analysis", help="cluster_analysis.json (default: <workspace>/analysis/cluster_analysis.json)."
        ),
    ] = None,
    batch: Annotated[bool, typer.Option("--batch", help="No questions: select by the filters.")] = False,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Export selected cluster folders here.")
    ] = None,
    tiers: Annotated[
        list[str] | None, typer.Option("--tiers", help="Tiers to select, e.g. --tiers S A.")
    ] = None,
    min_images: Annotated[
        int | None, typer.Option("--min-images", help="Minimum images per cluster.")
    ] = None,
    types: Annotated[list[str] | None, typer.Option("--types", help="human / yokai / unknown.")] = None,
    cluster_ids: Annotated[
        list[int] | None, typer.Option("--clusters", help="Explicit cluster ids (override the filters).")
    ] = None,
    name: Annotated[list[str] | None, typer.Option("--name", help="ID=NAME, e.g. --name 3=Jibanyan.")] = None,
    selection_file: Annotated[
        Path | None,
        typer.Option("--selection-file", help="Where to write selection.json (default: <workspace>/)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="HTML report opened at a cluster (default: next to --analysis)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Pipeline config file (TOML or JSON).")
    ] = None,
) -> None:
    """Select clusters to train: batch filters, or browse interactively when --batch is not given."""
    from yokai_pipeline import analysis, edits, selection

    workspace = clusters.resolve().parent
    analysis_path = analysis_file or workspace / "analysis" / "cluster_analysis.json"
    selection_path = selection_file or workspace / "selection.json"
    try:
        base = load_config(config).selection.model_dump()
        overrides: dict[str, Any] = {
            "tiers": [t.upper() for t in tiers] if tiers else None,
            "types": [t.lower() for t in types] if types else None,
            "min_images": min_images,
            "clusters": cluster_ids or None,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        from yokai_pipeline.naming import read_names
        from yokai_pipeline.workspace import Workspace

        # Names from `yokai name` (naming.json) first; the config's and --name override them.
        named = read_names(Workspace(workspace))
        base["names"] = {**base.get("names", {}), **_parse_names(name or [])}
        cfg = SelectionConfig.model_validate(base)
    except ValidationError as exc:
        console.print(f"[red]invalid selection options:[/red] {exc}")
        raise typer.Exit(2) from exc
    except YokaiError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    try:
        result = analysis.read_analysis(analysis_path)
        known = {str(c["id"]) for c in result["clusters"]}
        # A cluster named by reference but not analysed yet (seeded after the analysis) is left out.
        named = {k: v for k, v in named.items() if k in known and k not in cfg.names}
        cfg = cfg.model_copy(update={"names": {**named, **cfg.names}})
        # the review edits apply here as in the dataset flow, in both modes
        attrs = _review_attributes(Workspace(workspace))
        edits.apply_to_analysis(result, attrs)
        if batch:
            sel = edits.select_with_edits(result, cfg, attrs)
        else:
            sel = _interactive(
                result,
                clusters,
                cfg,
                attrs,
                report_html=report or analysis_path.with_suffix(".html"),
                output_dir=output_dir,
                selection_path=selection_path,
            )
        selection.write_selection(selection_path, sel)
        counts = selection.export_selection(sel, clusters, output_dir) if output_dir else None
    except YokaiError as exc:
        console.print(f"[red]select failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    typer.echo(f"Selected {len(sel['characters'])} characters:")
    for ch in sel["characters"]:
        typer.echo(
            f"  cluster {ch['cluster']:3d}  {ch['name']:<20} trigger={ch['trigger']:<20} "
            f"tier {ch['tier']}  {ch['images']:4d} images  {ch['type']}"
        )
    typer.echo(f"Selection: {selection_path}")
    if counts is not None:
        typer.echo(f"Exported {sum(counts.values())} files in {len(counts)} folders to {output_dir}")


def register(app: typer.Typer) -> None:
    """Add `yokai select`."""
    app.command("select", cls=MultiValueCommand)(select)
