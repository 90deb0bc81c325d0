"""Character selection: which clusters become characters to train, their names and trigger words.

Batch mode filters an analysis (``cluster_analysis.json``) by tier, type and size or takes
explicit cluster ids; interactive mode lets a person browse clusters in the terminal. Both
produce a ``selection.json`` (docs/data-formats.md) that later stages read::

    {"version": 1, "source": "character_clusters/clusters.json",
     "characters": [{"cluster": 3, "name": "char_003", "trigger": "char003",
                     "type": "yokai", "tier": "A", "images": 64}]}

``name`` is always a safe single path component (:func:`fsio.safe_name`): later stages use it
in folder names. ``trigger`` is one caption token: no commas, whitespace or control characters.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import unicodedata
import webbrowser
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from yokai_pipeline import fsio
from yokai_pipeline.config import SelectionConfig
from yokai_pipeline.errors import BadInputError, ConfigError

SELECTION_KEYS = ("cluster", "name", "trigger", "type", "tier", "images")


def default_name(cluster_id: int) -> str:
    """The folder/file name of an unnamed cluster, as in the guide: ``char_003``."""
    return f"char_{int(cluster_id):03d}"


def default_trigger(cluster_id: int) -> str:
    """The trigger word of an unnamed cluster, as in the guide's captions: ``char003``."""
    return f"char{int(cluster_id):03d}"


def character_name(name: str, cluster_id: int) -> str:
    """A user-given name as a safe folder name (falls back to ``char_003``)."""
    return fsio.safe_name(name, fallback=default_name(cluster_id), max_len=64)


def trigger_word(name: str, cluster_id: int) -> str:
    """A caption trigger token from a name: lower case, no commas, spaces, newlines or NUL."""
    text = unicodedata.normalize("NFKC", str(name)).replace("\x00", "")
    # Control characters (NUL, newlines, tabs) and caption separators become word breaks.
    text = "".join(" " if unicodedata.category(ch).startswith("C") or ch in ",;" else ch for ch in text)
    token = fsio.safe_name(
        re.sub(r"\s+", "_", text.strip()), fallback=default_trigger(cluster_id), max_len=48
    )
    return token.lower()


def _by_id(analysis: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(c["id"]): c for c in analysis["clusters"]}


def matches_filters(
    cluster: dict[str, Any],
    tiers: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    min_images: int = 0,
) -> bool:
    """Whether one analysed cluster passes the tier / type / size filters (None = any)."""
    if tiers is not None and cluster["tier"] not in set(tiers):
        return False
    if types is not None and cluster["type"] not in set(types):
        return False
    return int(cluster["images"]) >= min_images


def select_clusters(analysis: dict[str, Any], cfg: SelectionConfig | None = None) -> dict[str, Any]:
    """Build a selection from an analysis result.

    Args:
        analysis: a cluster analysis (``analysis.analyze_clusters`` / ``cluster_analysis.json``).
        cfg: tiers, types, min_images; ``clusters`` (explicit ids) overrides the filters;
            ``names`` maps cluster id (as a string) to a character name.

    Returns:
        The selection dict (format in the module docstring), characters sorted by cluster id.

    Raises:
        ConfigError: an explicit or named cluster id is not in the analysis, or two clusters
            end up with the same name or trigger word.
    """
    cfg = cfg or SelectionConfig()
    by_id = _by_id(analysis)
    names: dict[int, str] = {}
    for key, value in cfg.names.items():
        try:
            cid = int(key)
        except ValueError as exc:
            raise ConfigError(f"selection.names key {key!r} is not a cluster id") from exc
        if cid not in by_id:
            raise ConfigError(f"selection.names names cluster {cid}, which is not in the analysis")
        names[cid] = value
    if cfg.clusters is not None:
        missing = sorted(set(cfg.clusters) - by_id.keys())
        if missing:
            raise ConfigError(f"selection.clusters: {missing} not in the analysis (ids: {sorted(by_id)})")
        ids = sorted(set(cfg.clusters))
    else:
        ids = sorted(
            cid for cid, c in by_id.items() if matches_filters(c, cfg.tiers, cfg.types, cfg.min_images)
        )
    characters = []
    seen_names: dict[str, int] = {}
    seen_triggers: dict[str, int] = {}
    for cid in ids:
        c = by_id[cid]
        if cid in names:
            name, trigger = character_name(names[cid], cid), trigger_word(names[cid], cid)
        else:  # the guide's naming: folders and configs char_003, trigger word char003
            name, trigger = default_name(cid), default_trigger(cid)
        for value, seen, what in (
            (name.lower(), seen_names, "name"),
            (trigger, seen_triggers, "trigger word"),
        ):
            if value in seen:
                raise ConfigError(
                    f"clusters {seen[value]} and {cid} would share the {what} {value!r}; rename one"
                )
            seen[value] = cid
        characters.append(
            {
                "cluster": cid,
                "name": name,
                "trigger": trigger,
                "type": c["type"],
                "tier": c["tier"],
                "images": int(c["images"]),
            }
        )
    source = (
        analysis.get("source")
        or f"{Path(analysis.get('clusters_dir', 'character_clusters')).name}/clusters.json"
    )
    return {"version": 1, "source": source, "characters": characters}


def write_selection(path: str | Path, selection: dict[str, Any]) -> Path:
    """Write selection.json atomically (validated first)."""
    _validate(selection, path)
    return fsio.atomic_write_json(path, selection)


def read_selection(path: str | Path) -> dict[str, Any]:
    """Read and validate a selection.json; raises BadInputError naming the file and problem."""
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot read selection JSON: {exc}") from exc
    _validate(data, path)
    return data


def _validate(selection: Any, path: str | Path) -> None:
    if not isinstance(selection, dict) or selection.get("version") != 1:
        raise BadInputError(path, "not a selection.json (version 1)")
    chars = selection.get("characters")
    if not isinstance(chars, list):
        raise BadInputError(path, "'characters' must be a list")
    names = set()
    for i, ch in enumerate(chars):
        if not isinstance(ch, dict) or not set(SELECTION_KEYS) <= ch.keys():
            raise BadInputError(path, f"character {i} lacks one of {', '.join(SELECTION_KEYS)}")
        if ch["name"] != fsio.safe_name(ch["name"], fallback="") or not ch["name"]:
            raise BadInputError(path, f"character {i} name {ch['name']!r} is not a safe folder name")
        if not ch["trigger"] or re.search(r"[,\s\x00-\x1f]", ch["trigger"]):
            raise BadInputError(
                path, f"character {i} trigger {ch['trigger']!r} has commas, spaces or control chars"
            )
        if ch["name"].lower() in names:
            raise BadInputError(path, f"character name {ch['name']!r} appears twice")
        names.add(ch["name"].lower())


def _cluster_folders(clusters_dir: Path) -> dict[int, str]:
    index = clusters_dir / "clusters.json"
    if index.exists():
        try:
            return {int(c["id"]): str(c["folder"]) for c in fsio.read_json(index)["clusters"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInputError(index, f"not a clusters.json: {exc}") from exc
    return {}


def _place(src: Path, dest: Path, link: bool) -> None:
    """Hard-link (or copy) ``src`` onto ``dest`` through a temp name, so ``dest`` is never partial."""
    if link:
        tmp = dest.with_name(f"{fsio.TMP_PREFIX}{dest.name}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            os.replace(tmp, dest)
            return
        except OSError:
            tmp.unlink(missing_ok=True)  # another filesystem: fall back to a copy
    with fsio.atomic_path(dest) as t:
        shutil.copyfile(src, t)


def export_selection(
    selection: dict[str, Any],
    clusters_dir: str | Path,
    output_dir: str | Path,
    *,
    link: bool = True,
) -> dict[str, int]:
    """Copy (hard-link when possible) the selected cluster folders into ``output_dir/<name>/``.

    Also writes ``output_dir/selection.json``. A folder that is missing or a file that cannot
    be placed is reported in the raised error only after every other character was exported.

    Args:
        selection: a selection dict.
        clusters_dir: the ``character_clusters`` folder.
        output_dir: destination; every written path stays inside it.
        link: hard-link files (falls back to copying across filesystems).

    Returns:
        Character name -> number of files exported.

    Raises:
        BadInputError: a selected cluster folder is missing (after exporting the rest).
    """
    _validate(selection, "<selection>")
    clusters_dir, output_dir = Path(clusters_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    root = output_dir.resolve()
    folders = _cluster_folders(clusters_dir)
    counts: dict[str, int] = {}
    problems: list[str] = []
    for ch in selection["characters"]:
        cid = int(ch["cluster"])
        folder = folders.get(cid, f"cluster_{cid:03d}")
        src = clusters_dir / Path(folder).name
        name = fsio.safe_name(ch["name"], fallback=default_name(cid))
        dest = (output_dir / name).resolve()
        if dest.parent != root:  # safe_name guarantees this; the check keeps it true if that changes
            problems.append(f"character {name!r} would leave {root}")
            continue
        if not src.is_dir():
            problems.append(f"cluster {cid}: folder {src} is missing")
            continue
        dest.mkdir(exist_ok=True)
        n = 0
        for f in sorted(src.iterdir()):
            if not f.is_file() or f.name.startswith(fsio.TMP_PREFIX):
                continue
            _place(f, dest / f.name, link)
            n += 1
        counts[name] = n
    fsio.atomic_write_json(output_dir / "selection.json", selection)
    if problems:
        raise BadInputError(clusters_dir, "; ".join(problems))
    return counts


# --------------------------------------------------------------------------- interactive

HELP = """Commands (cluster ids are numbers, e.g. 3):
  n / next, p / prev, g ID / goto ID   browse clusters (within the current filter)
  s / show                             details and sample image paths of the current cluster
  o / open                             open the HTML report at the current cluster
  f tier S A | f type yokai | f min 20 | f clear   filter the clusters browsed
  l / list                             list clusters in the filter (* = selected)
  sel / selected                       list the selection
  + [ID ...] / select [ID ...]         select the current (or given) clusters
  - [ID ...] / deselect [ID ...]       deselect
  auto                                 select every recommended cluster (tiers S/A/B)
  name NAME | name ID=NAME             name a cluster as a character (also its trigger word)
  export [DIR]                         export the selected cluster folders
  save [FILE]                          write selection.json
  h / help, q / quit                   help, finish"""


class _Session:
    """State of one interactive selection session."""

    def __init__(
        self,
        analysis: dict[str, Any],
        clusters_dir: Path,
        report_html: Path | None,
        print_fn: Callable[[str], Any],
        open_fn: Callable[[str], Any],
        output_dir: Path | None,
        selection_path: Path | None,
    ):
        self.analysis = analysis
        self.by_id = _by_id(analysis)
        self.clusters_dir = clusters_dir
        self.report_html = report_html
        self.print = print_fn
        self.open = open_fn
        self.output_dir = output_dir
        self.selection_path = selection_path
        self.tiers: list[str] | None = None
        self.types: list[str] | None = None
        self.min_images = 0
        self.selected: set[int] = set()
        self.names: dict[int, str] = {}
        self.view: list[int] = sorted(self.by_id)
        self.pos = 0

    # ---- helpers
    def current(self) -> int | None:
        return self.view[self.pos] if self.view else None

    def refilter(self) -> None:
        cur = self.current()
        self.view = [
            cid
            for cid in sorted(self.by_id)
            if matches_filters(self.by_id[cid], self.tiers, self.types, self.min_images)
        ]
        self.pos = self.view.index(cur) if cur in self.view else 0
        self.print(f"{len(self.view)} of {len(self.by_id)} clusters in the filter")

    def line(self, cid: int) -> str:
        c = self.by_id[cid]
        mark = "*" if cid in self.selected else " "
        name = f" name={self.names[cid]!r}" if cid in self.names else ""
        return (
            f"{mark} cluster {cid:3d} [{c['tier']}] {c['images']:4d} images  "
            f"{c['type']} ({c.get('type_confidence', 0):.0%})  {c.get('status', '')}{name}"
        )

    def selection(self) -> dict[str, Any]:
        cfg = SelectionConfig(
            clusters=sorted(self.selected), names={str(k): v for k, v in self.names.items()}
        )
        return select_clusters(self.analysis, cfg)

    def ids(self, args: list[str]) -> list[int]:
        if not args:
            cur = self.current()
            return [] if cur is None else [cur]
        out = []
        for a in args:
            try:
                cid = int(a)
            except ValueError:
                self.print(f"not a cluster id: {a!r}")
                continue
            if cid not in self.by_id:
                self.print(f"no cluster {cid}")
                continue
            out.append(cid)
        return out

    # ---- commands
    def show(self) -> None:
        cid = self.current()
        if cid is None:
            self.print("no clusters in the filter (f clear)")
            return
        c = self.by_id[cid]
        self.print(f"[{self.pos + 1}/{len(self.view)}] " + self.line(cid).strip())
        q = c.get("quality", {})
        if q:
            self.print(
                f"  sharpness {q.get('sharpness', 0):.1f}  resolution {q.get('resolution')}  "
                f"alpha {q.get('alpha_coverage', 0):.0%}  duplicates {q.get('duplicate_ratio', 0):.0%}  "
                f"diversity {c.get('diversity', 0):.3f}"
            )
        for rel in c.get("samples", [])[:6]:
            self.print(f"  {(self.clusters_dir / rel).as_posix()}")

    def goto(self, args: list[str]) -> None:
        ids = self.ids(args[:1])
        if not ids:
            return
        if ids[0] not in self.view:
            self.print(f"cluster {ids[0]} is outside the filter (f clear)")
            return
        self.pos = self.view.index(ids[0])
        self.show()

    def filter(self, args: list[str]) -> None:
        if not args:
            self.print(
                f"filter: tiers={self.tiers or 'any'} types={self.types or 'any'} min={self.min_images}"
            )
            return
        what, vals = args[0].lower(), args[1:]
        if what == "clear":
            self.tiers, self.types, self.min_images = None, None, 0
        elif what == "tier":
            bad = [v for v in vals if v.upper() not in ("S", "A", "B", "C", "D")]
            if bad or not vals:
                self.print(f"tiers are S A B C D (got {' '.join(vals) or 'none'})")
                return
            self.tiers = [v.upper() for v in vals]
        elif what == "type":
            bad = [v for v in vals if v.lower() not in ("human", "yokai", "unknown")]
            if bad or not vals:
                self.print(f"types are human yokai unknown (got {' '.join(vals) or 'none'})")
                return
            self.types = [v.lower() for v in vals]
        elif what in ("min", "size"):
            try:
                self.min_images = int(vals[0])
            except (IndexError, ValueError):
                self.print("usage: f min 20")
                return
        else:
            self.print("usage: f tier S A | f type yokai | f min 20 | f clear")
            return
        self.refilter()

    def name(self, rest: str) -> None:
        rest = rest.strip()
        m = re.match(r"^(\d+)\s*=\s*(.*)$", rest, re.S)
        if m:
            cid, value = int(m.group(1)), m.group(2).strip()
            if cid not in self.by_id:
                self.print(f"no cluster {cid}")
                return
        else:
            cur = self.current()
            if cur is None:
                self.print("no current cluster")
                return
            cid, value = cur, rest
        if not value:
            self.print("usage: name NAME | name ID=NAME")
            return
        name, trigger = character_name(value, cid), trigger_word(value, cid)
        for other, other_value in self.names.items():
            if other != cid and character_name(other_value, other).lower() == name.lower():
                self.print(f"cluster {other} is already named {name!r}")
                return
        self.names[cid] = value
        self.selected.add(cid)
        self.print(f"cluster {cid} -> name {name!r}, trigger {trigger!r} (selected)")

    def export(self, args: list[str]) -> None:
        target = Path(args[0]) if args else self.output_dir
        if target is None:
            self.print("usage: export DIR (no --output-dir given)")
            return
        try:
            counts = export_selection(self.selection(), self.clusters_dir, target)
        except (BadInputError, ConfigError) as exc:
            self.print(f"export failed: {exc}")
            return
        self.print(f"exported {len(counts)} characters ({sum(counts.values())} files) to {target}")

    def save(self, args: list[str]) -> None:
        target = Path(args[0]) if args else self.selection_path
        if target is None:
            self.print("usage: save FILE")
            return
        try:
            write_selection(target, self.selection())
        except (BadInputError, ConfigError) as exc:
            self.print(f"save failed: {exc}")
            return
        self.print(f"saved {len(self.selected)} characters to {target}")

    def run(self, raw: str) -> bool:
        """Run one command line; returns False on quit."""
        raw = raw.strip()
        if not raw:
            return True
        cmd, _, rest = raw.partition(" ")
        cmd = cmd.lower()
        if cmd == "name":  # the name may contain quotes, so it is not shell-split
            self.name(rest)
            return True
        try:
            args = shlex.split(rest)
        except ValueError:
            args = rest.split()
        if cmd in ("q", "quit", "exit"):
            return False
        if cmd in ("h", "help", "?"):
            self.print(HELP)
        elif cmd in ("n", "next"):
            if self.view:
                self.pos = min(self.pos + 1, len(self.view) - 1)
            self.show()
        elif cmd in ("p", "prev"):
            self.pos = max(self.pos - 1, 0)
            self.show()
        elif cmd in ("g", "goto"):
            self.goto(args)
        elif cmd in ("s", "show"):
            self.show()
        elif cmd in ("o", "open"):
            cid = self.current()
            if self.report_html is None or cid is None:
                self.print("no report or no current cluster")
            else:
                from yokai_pipeline.analysis import cluster_anchor

                url = f"{self.report_html.resolve().as_uri()}#{cluster_anchor(cid)}"
                self.print(f"opening {url}")
                self.open(url)
        elif cmd in ("f", "filter"):
            self.filter(args)
        elif cmd in ("l", "list", "ls"):
            for cid in self.view:
                self.print(self.line(cid))
        elif cmd in ("sel", "selected"):
            try:
                chars = self.selection()["characters"]
            except ConfigError as exc:
                self.print(str(exc))
                return True
            for ch in chars:
                self.print(
                    f"  cluster {ch['cluster']:3d} {ch['name']} (trigger {ch['trigger']}) [{ch['tier']}]"
                )
            self.print(f"{len(chars)} selected")
        elif cmd in ("+", "select", "add"):
            ids = self.ids(args)
            self.selected.update(ids)
            self.print(f"selected {ids}; {len(self.selected)} in the selection")
        elif cmd in ("-", "deselect", "remove", "rm"):
            ids = self.ids(args)
            self.selected.difference_update(ids)
            self.print(f"deselected {ids}; {len(self.selected)} in the selection")
        elif cmd == "auto":
            rec = [cid for cid, c in self.by_id.items() if c.get("recommended")]
            self.selected.update(rec)
            self.print(f"selected {len(rec)} recommended clusters; {len(self.selected)} in the selection")
        elif cmd == "export":
            self.export(args)
        elif cmd == "save":
            self.save(args)
        else:
            self.print(f"unknown command {cmd!r}; h for help")
        return True


def interactive_select(
    analysis: dict[str, Any],
    clusters_dir: str | Path,
    report_html: str | Path | None = None,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[[str], Any] = print,
    open_fn: Callable[[str], Any] = webbrowser.open,
    *,
    output_dir: str | Path | None = None,
    selection_path: str | Path | None = None,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Browse clusters in the terminal and pick characters (commands in :data:`HELP`).

    Args:
        analysis: a cluster analysis.
        clusters_dir: the ``character_clusters`` folder (sample paths, export source).
        report_html: the HTML report, opened at a cluster's anchor by ``open``.
        input_fn: reads one command line (scripted in tests); EOF ends the session.
        print_fn: writes one line.
        open_fn: opens a URL (``webbrowser.open``).
        output_dir: default folder of ``export``.
        selection_path: default file of ``save``.
        names: names given up front (cluster id -> name); those clusters start selected.

    Returns:
        The selection at the end of the session.
    """
    s = _Session(
        analysis,
        Path(clusters_dir),
        Path(report_html) if report_html else None,
        print_fn,
        open_fn,
        Path(output_dir) if output_dir else None,
        Path(selection_path) if selection_path else None,
    )
    for cid, value in (names or {}).items():
        s.name(f"{cid}={value}")
    print_fn(f"{len(s.by_id)} clusters. h for help.")
    s.show()
    while True:
        try:
            raw = input_fn("select> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not s.run(raw):
            break
    return s.selection()
