"""`pgolf show PATH...`: parse, run pgolf.show.show, print the lineage table (exit 3 when a digest mismatches)."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pgolf import log
from pgolf.errors import InvalidInput
from pgolf.plots import figure_class
from pgolf.show import Shown, StageRow, display_path, figures_text, first_problem, show, write_plots
from pgolf.stages.common import JSON_OPTION

LOG_WIDTH = 10_000  # piped to a file or another program, a table keeps one line per row, however wide


def digests_cell(rows: list[StageRow], prefix: bool) -> Text:
    """`ok`, or each problem in red (prefixed by its stage when the cell covers a whole lineage); gone inputs
    in yellow."""
    problems = [f"{row.stage}: {p}" if prefix else p for row in rows for p in row.problems]
    notes = [f"{row.stage}: {n}" if prefix else n for row in rows for n in row.notes]
    cell = Text("; ".join(problems), style="red") if problems else Text("ok", style="green")
    if notes:
        cell.append("; " + "; ".join(notes), style="yellow")
    return cell


def short_sha(row: StageRow) -> str:
    return (row.manifest.get("config_sha256") or "?")[:8]


def when(row: StageRow) -> str:
    return (row.manifest.get("created") or "?").replace("T", " ").rstrip("Z")


def lineage_table(item: Shown) -> Table:
    """One output: a row per stage of its lineage, upstream first."""
    table = Table(title=f"{display_path(item.path)}: {item.head.stage} and its lineage", title_justify="left")
    for column in ("stage", "output", "created", "config", "key figures", "digests"):
        table.add_column(column)
    for row in item.in_order():
        table.add_row(row.stage, display_path(row.dir), when(row), short_sha(row), figures_text(row.stage, row.figures),
                      digests_cell([row], prefix=False))
    return table


def side_by_side(shown: list[Shown]) -> Table:
    """Several outputs: a row each, its own figures and its upstream chain's config digests."""
    table = Table(title=f"{len(shown)} outputs", title_justify="left")
    for column in ("output", "stage", "created", "config", "key figures", "from", "digests"):
        table.add_column(column)
    for item in shown:
        chain = " <- ".join(f"{row.stage} {short_sha(row)}" for row in item.upstream())
        head = item.head
        table.add_row(display_path(item.path), head.stage, when(head), short_sha(head),
                      figures_text(head.stage, head.figures), chain, digests_cell(item.in_order(), prefix=True))
    return table


def show_outputs(
    paths: list[Path] = typer.Argument(..., help="Stage output directories (an eval, a bundle, a train run, ...)."),
    sort: str = typer.Option(None, "--sort", help="Order several outputs: bpb (lowest first) or created."),
    plot: bool = typer.Option(False, "--plot", help="Write PNG plots (train curves, n-gram sweep heat map, bytes "
                              "per tensor group) beside the outputs; needs the `plot` extra."),
    plot_dir: Path = typer.Option(None, "--plot-dir", help="Write the plots here instead (implies --plot)."),
    as_json: bool = JSON_OPTION,
):
    """Lineage of stage outputs (tokenize -> train -> quantize -> compress -> eval -> bundle) with each stage's
    key figures, every output and recorded input re-hashed; several PATHs side by side, a row each.

    Exit 0 when every digest verifies, 3 when one mismatches (the table still shows it, flagged) or a PATH is
    not a pgolf stage output.

    Example: pgolf show artifacts/run1/eval*/ --sort bpb
    """
    plot = plot or plot_dir is not None
    if plot:
        figure_class()  # a missing extra fails before any work
    shown = show(paths, sort=sort)
    table = lineage_table(shown[0]) if len(shown) == 1 else side_by_side(shown)
    console = log.console if log.console.is_terminal else Console(stderr=True, highlight=False, width=LOG_WIDTH)
    console.print(table)
    written, left_out = write_plots(shown, plot_dir) if plot else ([], [])
    for path in written:
        log.info(f"wrote {display_path(path)}")
    for directory in left_out:
        log.warn(f"{display_path(directory)}: not plotted, its outputs no longer match its manifest")
    if plot and not written and not left_out:
        log.warn("these outputs hold nothing to plot (a train run, a quantize output or an eval sweep)")
    if as_json:
        log.emit_json({"outputs": [item.as_json() for item in shown], "verified": all(i.verified for i in shown),
                       "plots": [str(path) for path in written]})
    problem = first_problem(shown)
    if problem:
        raise InvalidInput(problem)


def register(app: typer.Typer) -> None:
    app.command("show")(show_outputs)
