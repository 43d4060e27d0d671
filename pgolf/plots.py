"""PNG plots of stage outputs for `pgolf show --plot`: train curves, an n-gram sweep's heat map, a quantized
model's bytes per tensor group.

matplotlib is an optional extra (`pip install 'pgolf[plot]'`), imported only when a plot is drawn, with the Agg
backend (no display). Figures are built without pyplot (no global state) at a fixed size, so a PNG's pixel size is
FIGSIZE * DPI. A PNG is written atomically and tagged `Software: pgolf show`; an existing file without that tag
is never overwritten.
"""

import io
import json
from pathlib import Path

from pgolf.artifacts import atomic_write_bytes
from pgolf.errors import InvalidInput, UsageError

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # so every PNG is 800 x 450 pixels
SOFTWARE = "pgolf show"
TAG_BYTES = 4096  # a PNG's tEXt chunks come before its image data


def figure_class():
    """matplotlib's Figure, on the Agg backend; UsageError (exit 2) naming the extra when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'pgolf[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def new_figure(ncols: int = 1):
    figure = figure_class()(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False)[0]


def read_train_log(path: Path) -> list[dict]:
    """The records of a train_log.jsonl; InvalidInput naming the file for a line that is not a JSON object."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(record, dict):
            raise InvalidInput(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def curve(records: list[dict], event: str, value: str) -> tuple[list, list]:
    points = [(r["step"], r[value]) for r in records if r.get("event") == event and value in r and "step" in r]
    return [step for step, _ in points], [y for _, y in points]


def train_curves(runs: list[tuple[str, list[dict]]]):
    """Train loss (left) and validation bpb (right) against step, one line per (label, train_log records)."""
    figure, (loss_axes, val_axes) = new_figure(2)
    for label, records in runs:
        loss_axes.plot(*curve(records, "train", "loss"), label=label, linewidth=1)
        val_axes.plot(*curve(records, "val", "val_bpb"), marker="o", label=label)
    loss_axes.set(title="train loss", xlabel="step", ylabel="loss (nats)")
    val_axes.set(title="validation", xlabel="step", ylabel="val_bpb")
    loss_axes.legend(fontsize="small")
    return figure


def sweep_point_name(point: dict) -> str:
    """A sweep row's scorer name (`ngram3_a0.2_entropy`, `tilt8_b0.5_t0.8_m2`); rows written before tilt points
    existed hold only order, alpha and alpha_mode."""
    if "name" in point:
        return point["name"]
    return f"ngram{point['order']}_a{point['alpha']:g}" + ("_entropy" if point["alpha_mode"] == "entropy" else "")


def sweep_heatmap(sweep: list[dict], title: str):
    """val_bpb of a sweep's grid: one row per method and order (n-gram 3, tilt 8, ...), one column per remaining
    setting (alpha; boost, threshold and min count), each cell labelled (and a colour bar)."""
    cells = {}
    for point in sweep:
        kind, _, setting = sweep_point_name(point).partition("_")
        method = kind.rstrip("0123456789")
        cells[(f"{method} {kind[len(method):]}", setting)] = point["val_bpb"]
    rows = sorted({row for row, _ in cells}, key=lambda row: (row.split()[0], int(row.split()[1])))
    columns = sorted({column for _, column in cells})
    grid = [[cells.get((row, column), float("nan")) for column in columns] for row in rows]
    figure, (axes,) = new_figure()
    image = axes.imshow(grid, cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=30 if len(columns) > 4 else 0, fontsize="small")
    axes.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # a method without this setting leaves the cell empty (NaN)
                dark = image.norm(value) > 0.5  # viridis_r: high val_bpb is dark
                axes.text(j, i, f"{value:.4f}", ha="center", va="center", color="white" if dark else "black",
                          fontsize="small")
    axes.set(title=title, xlabel="setting", ylabel="method, order")
    figure.colorbar(image, ax=axes, label="val_bpb")
    return figure


def tensor_group(name: str) -> str:
    """`block N` for a transformer block's tensors, `embedding` for the token embedding, else the module name."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        return f"block {parts[1]}"
    return "embedding" if parts[0] == "tok_emb" else parts[0]


def quantized_bytes(tensors: dict, title: str):
    """Bytes of a quantize output's tensors summed per group, stacked by scheme (a quantize manifest's
    metrics.tensors: {name: {scheme, bytes, ...}})."""
    groups: dict[str, dict[str, int]] = {}
    for name, row in tensors.items():
        by_scheme = groups.setdefault(tensor_group(name), {})
        by_scheme[row["scheme"]] = by_scheme.get(row["scheme"], 0) + row["bytes"]
    labels = sorted(groups, key=lambda g: (not g.startswith("block"), int(g.split()[1]) if g.startswith("block ")
                                           else 0, g))
    figure, (axes,) = new_figure()
    bottoms = [0] * len(labels)
    for scheme in sorted({scheme for by_scheme in groups.values() for scheme in by_scheme}):
        heights = [groups[label].get(scheme, 0) for label in labels]
        axes.bar(labels, heights, bottom=bottoms, label=scheme)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes.set(title=title, ylabel="bytes (before compression)")
    axes.tick_params(axis="x", labelrotation=45)
    axes.legend(fontsize="small")
    return figure


def check_target(path: Path) -> None:
    """InvalidInput unless `path` is free or a PNG an earlier `pgolf show` wrote (pgolf overwrites only its own)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_file() and not path.is_symlink():
        with open(path, "rb") as f:
            head = f.read(TAG_BYTES)
        if head.startswith(b"\x89PNG") and b"Software\x00" + SOFTWARE.encode() in head:
            return
    raise InvalidInput(f"{path}: exists and was not written by pgolf show; move it away or give --plot-dir")


def save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": SOFTWARE})
    atomic_write_bytes(path, buffer.getvalue())
