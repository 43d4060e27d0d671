"""`pgolf show`: the lineage of stage outputs at a glance, with every digest checked again.

From a stage output, follow its manifest's input records upstream (tokenize -> train -> quantize -> compress ->
eval -> bundle) and, for each stage found, read its key figures from the manifest and re-hash what it recorded:
its own outputs (still what its manifest lists?) and its inputs (still the files it read?). Unlike
artifacts.lineage, which refuses a changed upstream, this walk keeps going and reports the change, so a tampered
chain is shown with the broken links flagged. A recorded input that is gone (a corpus deleted after tokenizing)
is noted, not failed: only a file that is there and differs is a mismatch.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.artifacts import (
    ARTIFACT_BYTE_LIMIT,
    MANIFEST,
    confined_output,
    input_candidates,
    output_path,
    read_manifest,
    sha256_file,
)
from pgolf.errors import InvalidInput, UsageError
from pgolf.plots import (
    check_target,
    quantized_bytes,
    read_train_log,
    save,
    sweep_heatmap,
    sweep_point_name,
    train_curves,
)

PIPELINE = ("tokenize", "import", "train", "quantize", "compress", "eval", "bundle", "report")
SORT_KEYS = ("bpb", "created")
SHORT_SHA = 8


class Digests:
    """sha256 of each file once per invocation: the evals of one blob share their whole upstream chain."""

    def __init__(self):
        self.known: dict[tuple, str] = {}

    def __call__(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self.known:
            self.known[key] = sha256_file(path)
        return self.known[key]


@dataclass
class StageRow:
    """One stage output of a lineage: what it is, its key figures and what of it no longer verifies."""

    stage: str
    dir: Path
    manifest: dict
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # digest mismatches: the chain no longer holds
    notes: list[str] = field(default_factory=list)  # recorded inputs that are gone (not a failure)
    outputs_verified: bool = True  # its own files are what its manifest lists (what a plot may read)

    def as_json(self) -> dict:
        return {"stage": self.stage, "dir": str(self.dir), "created": self.manifest.get("created"),
                "config_sha256": self.manifest.get("config_sha256"), "figures": self.figures,
                "verified": not self.problems, "outputs_verified": self.outputs_verified,
                "problems": self.problems, "notes": self.notes}


@dataclass
class Shown:
    """One PATH: its own stage output first, then its upstream outputs in pipeline order."""

    path: Path
    rows: list[StageRow]

    @property
    def head(self) -> StageRow:
        return self.rows[0]

    @property
    def verified(self) -> bool:
        return not any(row.problems for row in self.rows)

    def in_order(self) -> list[StageRow]:
        """The rows in pipeline order (tokenize first), each stage's in the order met."""
        return sorted(self.rows, key=lambda row: stage_rank(row.stage))

    def upstream(self) -> list[StageRow]:
        """The upstream rows, nearest first."""
        return sorted(self.rows[1:], key=lambda row: -stage_rank(row.stage))

    def as_json(self) -> dict:
        return {"path": str(self.path), "stage": self.head.stage, "verified": self.verified,
                "lineage": [row.as_json() for row in self.in_order()]}


def stage_rank(stage: str) -> int:
    return PIPELINE.index(stage) if stage in PIPELINE else len(PIPELINE)


def record_name(record: dict) -> str:
    """How a flag names an input: `blob/manifest.json` for a manifest (its directory says which), else the file."""
    path = Path(record["path"])
    return f"{path.parent.name}/{path.name}" if path.name == MANIFEST else path.name


def check_outputs(directory: Path, manifest: dict, digest: Digests) -> list[str]:
    problems = []
    for out in manifest["outputs"]:
        path = confined_output(directory, out["path"])
        if not path.is_file():
            problems.append(f"MISSING {out['path']}")
        elif path.stat().st_size != out["bytes"] or digest(path) != out["sha256"]:
            problems.append(f"MISMATCH {out['path']}")
    return problems


def check_inputs(directory: Path, manifest: dict, digest: Digests) -> tuple[list[str], list[str], list[Path]]:
    """(problems, notes, upstream stage directories) of a manifest's input records: an input matches where one of
    its candidate paths holds a file of the recorded sha256; a stage directory holding it is followed upstream,
    matching or not, so the rest of the chain is still shown."""
    problems, notes, sources = [], [], []
    for record in manifest["inputs"]:
        present = [path for path in input_candidates(record, directory) if path.is_file()]
        if not present:
            notes.append(f"gone {record_name(record)}")
            continue
        found = next((path for path in present if digest(path) == record["sha256"]), None)
        if found is None:
            problems.append(f"MISMATCH input {record_name(record)}")
        source = (found or present[0]).parent
        if (source / MANIFEST).is_file() and source not in sources:
            sources.append(source)
    return problems, notes, sources


def walk(directory: Path, manifest: dict, digest: Digests) -> list[StageRow]:
    """The output at `directory` and every stage output upstream of it (each once: a report's runs share their
    data), breadth first."""
    rows, seen = [], {directory.resolve()}
    frontier = [(directory, manifest)]
    while frontier:
        following = []
        for current_dir, current in frontier:
            output_problems = check_outputs(current_dir, current, digest)
            problems, notes, sources = check_inputs(current_dir, current, digest)
            row = StageRow(current["stage"], current_dir, current, problems=output_problems + problems, notes=notes,
                           outputs_verified=not output_problems)
            rows.append(row)
            for source in sources:
                if source.resolve() in seen:
                    continue
                seen.add(source.resolve())
                try:
                    following.append((source, read_manifest(source)))
                except InvalidInput as e:
                    row.problems.append(f"BAD upstream {e}")
        frontier = following
    return rows


# ---------------------------------------------------------------------------------------------------------
# Key figures of each stage, from its manifest (and, for the size margin, the code bytes of its chain)


def code_bytes(rows: list[StageRow]) -> tuple[int | None, str]:
    """The code counted with the blob: a bundle's real train_gpt.py, else the allowance quantize fitted to."""
    for row in rows:
        if row.stage == "bundle" and isinstance(row.manifest["metrics"].get("bytes_code"), int):
            return row.manifest["metrics"]["bytes_code"], "code"
    for row in rows:
        if row.stage == "quantize" and isinstance(row.manifest["metrics"].get("code_bytes"), int):
            return row.manifest["metrics"]["code_bytes"], "code allowance"
    return None, ""


def eval_mode(metrics: dict) -> str:
    """flat / sliding stride N / doc, plus the n-gram cache (or its sweep) and TTT."""
    mode = metrics.get("mode")
    parts = [f"sliding stride {metrics.get('stride')}" if mode == "sliding" else str(mode)]
    ngram, sweep = metrics.get("ngram"), metrics.get("sweep")
    if ngram:
        parts.append(f"n-gram {ngram.get('order')} alpha {ngram.get('alpha')}")
    if sweep:
        parts.append(f"n-gram sweep of {len(sweep)}")
    if metrics.get("ttt"):
        parts.append("TTT")
    return " + ".join(parts)


def stage_figures(row: StageRow, rows: list[StageRow]) -> dict:
    metrics, stage = row.manifest["metrics"], row.stage
    if stage == "tokenize":
        return {"vocab_size": metrics.get("vocab_size"), "val_tokens": metrics.get("val", {}).get("tokens"),
                "train_tokens": metrics.get("train", {}).get("tokens")}
    if stage == "train":
        return {"steps": metrics.get("steps"), "ms_per_step": metrics.get("ms_per_step"),
                "val_bpb": metrics.get("val_bpb")}
    if stage == "import":
        return {"param_count": metrics.get("param_count")}
    if stage == "quantize":
        by_scheme = metrics.get("totals", {}).get("by_scheme", {})
        return {"plan": metrics.get("plan"), "bytes_by_scheme": {k: v.get("bytes") for k, v in by_scheme.items()},
                "mean_rel_error": metrics.get("totals", {}).get("mean_rel_error")}
    if stage == "compress":
        code, what = code_bytes(rows)
        blob = metrics.get("bytes")
        margin = ARTIFACT_BYTE_LIMIT - blob - (code or 0) if isinstance(blob, int) else None
        return {"codec": metrics.get("codec"), "level": metrics.get("level"), "bytes": blob, "code_bytes": code,
                "code_counted": what or "none", "margin": margin}
    if stage == "eval":
        sweep = metrics.get("sweep") or []
        best = min(sweep, key=lambda point: point["val_bpb"]) if sweep else None
        return {"mode": eval_mode(metrics), "val_bpb": metrics.get("val_bpb"), "sweep_best": best}
    if stage == "bundle":
        total = metrics.get("bytes_total")
        return {"bytes_total": total, "margin": ARTIFACT_BYTE_LIMIT - total if isinstance(total, int) else None,
                "val_bpb": metrics.get("val_bpb")}
    if stage == "report":
        submission, verdict = metrics.get("submission", {}), metrics.get("verdict") or {}
        return {"runs": submission.get("n_seeds"), "val_bpb": submission.get("val_bpb"),
                "p_value": submission.get("p_value"), "passed": verdict.get("passed")}
    return {}


def figures_text(stage: str, figures: dict) -> str:
    """The figures of `stage_figures` as one short line."""
    f = figures
    if stage == "tokenize":
        return f"vocab {f['vocab_size']}, val {count(f['val_tokens'])} / train {count(f['train_tokens'])} tokens"
    if stage == "train":
        return f"{f['steps']} steps, {number(f['ms_per_step'], '.1f')} ms/step, val_bpb {number(f['val_bpb'])}"
    if stage == "import":
        return f"{count(f['param_count'])} parameters"
    if stage == "quantize":
        schemes = ", ".join(f"{scheme} {count(size)} B" for scheme, size in f["bytes_by_scheme"].items())
        return f"plan {f['plan']}: {schemes}; mean rel. error {number(f['mean_rel_error'])}"
    if stage == "compress":
        level = f"-{f['level']}" if f["level"] is not None else ""
        code = f" with {count(f['code_bytes'])} B {f['code_counted']}" if f["code_bytes"] is not None else \
            " (blob alone)"
        return f"{f['codec']}{level}, {count(f['bytes'])} B, margin {count(f['margin'])} B{code}"
    if stage == "eval":
        text = f"{f['mode']}, val_bpb {number(f['val_bpb'])}"
        best = f["sweep_best"]
        if best:
            text += f" (model alone); sweep best {number(best['val_bpb'])} at {sweep_point_name(best)}"
        return text
    if stage == "bundle":
        return f"{count(f['bytes_total'])} B total, margin {count(f['margin'])} B, val_bpb {number(f['val_bpb'])}"
    if stage == "report":
        verdict = {True: "PASS", False: "FAIL", None: "undecided"}[f["passed"]]
        return f"{f['runs']} runs, mean val_bpb {number(f['val_bpb'])}, {verdict}"
    return ""


def count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def number(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


# ---------------------------------------------------------------------------------------------------------
# Entry point


def sort_value(shown: Shown, key: str):
    """Sort key for --sort: outputs without the figure go last."""
    if key == "created":
        return (0, shown.head.manifest.get("created") or "")
    bpb = shown.head.figures.get("val_bpb")
    return (0, bpb) if isinstance(bpb, (int, float)) else (1, 0.0)


def show(paths: list[Path], sort: str | None = None) -> list[Shown]:
    """The lineage of each output in `paths`, every digest of it checked; InvalidInput (exit 3) naming a path
    that is not a pgolf stage output, before anything is shown."""
    if sort is not None and sort not in SORT_KEYS:
        raise UsageError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    heads = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise InvalidInput(f"{path}: no such directory (give a pgolf stage output directory)")
        heads.append((path, read_manifest(path)))
    digest = Digests()
    shown = []
    for path, manifest in heads:
        rows = walk(path, manifest, digest)
        for row in rows:
            row.figures = stage_figures(row, rows)
        shown.append(Shown(path, rows))
    if sort is not None:
        shown.sort(key=lambda item: sort_value(item, sort))
    return shown


def first_problem(shown: list[Shown]) -> str | None:
    """`<dir>: <problem>` of the first flagged stage output (the most upstream: the likely cause), for the
    one-line error."""
    for item in shown:
        for row in item.in_order():
            if row.problems:
                return f"{row.dir}: {row.problems[0]} (see the digests column)"
    return None


def display_path(path: Path) -> str:
    """A path relative to the current directory when it lies below it, else absolute."""
    resolved = Path(path).resolve()
    cwd = Path.cwd()
    return os.path.relpath(resolved, cwd) if resolved.is_relative_to(cwd) else str(resolved)


# ---------------------------------------------------------------------------------------------------------
# Plots (--plot)


def stage_rows(shown: list[Shown], stage: str) -> list[StageRow]:
    """The distinct outputs of `stage` in the lineages shown, in the order met."""
    rows, seen = [], set()
    for item in shown:
        for row in item.rows:
            if row.stage == stage and row.dir.resolve() not in seen:
                seen.add(row.dir.resolve())
                rows.append(row)
    return rows


def plot_path(row: StageRow, kind: str, plot_dir: Path | None) -> Path:
    """`<output>.<kind>.png` beside the output (pgolf writes nothing into a stage directory its manifest does not
    list), or in plot_dir."""
    return (plot_dir or row.dir.resolve().parent) / f"{row.dir.resolve().name}.{kind}.png"


def train_runs(rows: list[StageRow]) -> list[tuple[str, list[dict]]]:
    return [(display_path(row.dir), read_train_log(output_path(row.manifest, row.dir, "log_jsonl"))) for row in rows]


def plan_plots(shown: list[Shown], plot_dir: Path | None = None) -> tuple[list[tuple[Path, Callable]], list[Path]]:
    """([(PNG path, function drawing its Figure)], [outputs left out]) of the plots the lineages hold: the train
    runs' curves overlaid (named after the first run), each quantize output's bytes per tensor group, each eval
    sweep's heat map. An output whose own files no longer verify is left out (a plot of changed data would look
    like the run's). Every target is checked before anything is drawn."""
    plans, left_out = [], []

    def usable(stage: str) -> list[StageRow]:
        rows = stage_rows(shown, stage)
        left_out.extend(row.dir for row in rows if not row.outputs_verified)
        return [row for row in rows if row.outputs_verified]

    trains = usable("train")
    if trains:
        plans.append((plot_path(trains[0], "curves", plot_dir), lambda: train_curves(train_runs(trains))))
    for row in usable("quantize"):
        title = f"{display_path(row.dir)}: plan {row.manifest['metrics'].get('plan')}"
        plans.append((plot_path(row, "bytes", plot_dir),
                      lambda row=row, title=title: quantized_bytes(row.manifest["metrics"].get("tensors", {}), title)))
    for row in usable("eval"):
        if row.manifest["metrics"].get("sweep"):
            title = f"{display_path(row.dir)}: {row.figures['mode']}"
            plans.append((plot_path(row, "sweep", plot_dir),
                          lambda row=row, title=title: sweep_heatmap(row.manifest["metrics"]["sweep"], title)))
    paths = [path for path, _ in plans]
    for index, path in enumerate(paths):
        if path in paths[:index]:
            raise UsageError(f"{path}: two plots of these outputs have this name in --plot-dir (outputs of one "
                             f"name from different runs); plot them separately or drop --plot-dir")
        check_target(path)
    return plans, left_out


def write_plots(shown: list[Shown], plot_dir: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Draw and write every plot of `plan_plots`; returns (the PNG paths, the outputs left out)."""
    if plot_dir is not None:
        try:
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidInput(f"{plot_dir}: cannot create the plot directory ({e.strerror})") from None
    plans, left_out = plan_plots(shown, Path(plot_dir) if plot_dir is not None else None)
    for path, draw in plans:
        save(draw(), path)
    return [path for path, _ in plans], left_out
