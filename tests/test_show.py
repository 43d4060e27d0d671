"""`pgolf show`: the lineage of real tiny outputs (tokenize -> train -> quantize -> compress -> eval -> bundle, built
once), its figures, --json, several outputs side by side, tampered digests (exit 3), non-pgolf paths, and the PNG
plots (--plot)."""

import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from pgolf.artifacts import ARTIFACT_BYTE_LIMIT
from pgolf.cli import main
from pgolf.plots import DPI, FIGSIZE, quantized_bytes, read_train_log, sweep_heatmap, train_curves
from tests.demo_data import TOKENIZER_NAME, write_demo_corpus

STEPS = 8
RUN_TOML = f"""
[train]
iterations = {STEPS}
val_every = 4
checkpoint_every = {STEPS}
"""
LINEAGE = ["tokenize", "train", "quantize", "compress", "eval"]
PIXELS = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))  # (height, width)


def run_main(*args) -> int:
    """`pgolf ARGS` in this process, through the console script's entry point; returns the exit code."""
    with mock.patch.object(sys, "argv", ["pgolf", *map(str, args)]):
        try:
            main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 0
    return 0


def pgolf(capsys, *args) -> tuple[int, str, str]:
    code = run_main(*args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory) -> dict[str, Path]:
    """One chain built once with the real stages, three evals of its blob (flat, sliding, an n-gram sweep), a
    bundle, and a second, shorter train run (for overlaid curves)."""
    root = tmp_path_factory.mktemp("show")
    config = root / "run.toml"
    config.write_text(RUN_TOML)
    run = root / "run"
    paths = {name: run / name for name in ("train", "q", "blob", "eval-flat", "eval-sliding", "eval-sweep",
                                             "submission")}
    paths["train2"] = root / "run2" / "train"
    commands = [
        ("train", tiny_data_dir, "--preset", "tiny", "--config", config, "--out", paths["train"]),
        ("train", tiny_data_dir, "--preset", "tiny", "--config", config, "--iterations", 4, "--seed", 7,
         "--out", paths["train2"]),
        ("quantize", paths["train"], "--plan", "int6", "--keep-float-numel", 1024, "--out", paths["q"]),
        ("compress", paths["q"], "--codec", "brotli", "--out", paths["blob"]),
        ("eval", paths["blob"], "--data", tiny_data_dir, "--out", paths["eval-flat"]),
        ("eval", paths["blob"], "--data", tiny_data_dir, "--sliding-stride", 64, "--out", paths["eval-sliding"]),
        ("eval", paths["blob"], "--data", tiny_data_dir, "--ngram-order", "2,3", "--alpha", "0.1,0.3", "--out",
         paths["eval-sweep"]),
        ("bundle", "--train", paths["train"], "--blob", paths["blob"], "--eval", paths["eval-sliding"], "--name",
         "show test", "--github-id", "test", "--out", paths["submission"]),
    ]
    for command in commands:
        assert run_main(*command) == 0, command
    return {"data": tiny_data_dir, **paths}


@pytest.fixture
def flipped():
    """Flip one byte of a file for the test's length; restored afterwards (the module's chain is shared)."""
    originals = {}

    def flip(path: Path, offset: int = 100) -> None:
        data = bytearray(path.read_bytes())
        originals[path] = bytes(data)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    yield flip
    for path, data in originals.items():
        path.write_bytes(data)


def test_show_prints_an_evals_lineage_with_each_stages_figures(runs, capsys):
    code, out, err = pgolf(capsys, "show", runs["eval-sliding"])
    assert code == 0 and out == ""
    train, quantize, compress, evaluation = (manifest(runs[k])["metrics"] for k in ("train", "q", "blob",
                                                                                    "eval-sliding"))
    lines = {line.split("│")[1].strip(): line for line in err.splitlines() if line.startswith("│")}
    assert list(lines) == LINEAGE
    assert f"{STEPS} steps" in lines["train"] and f"val_bpb {train['val_bpb']:.4f}" in lines["train"]
    by_scheme = quantize["totals"]["by_scheme"]
    assert "plan int6" in lines["quantize"] and f"int6 {by_scheme['int6']['bytes']:,} B" in lines["quantize"]
    margin = ARTIFACT_BYTE_LIMIT - compress["bytes"] - quantize["code_bytes"]  # the allowance quantize fitted to
    assert f"brotli-11, {compress['bytes']:,} B, margin {margin:,} B with {quantize['code_bytes']:,} B code " \
           f"allowance" in lines["compress"]
    assert f"sliding stride 64, val_bpb {evaluation['val_bpb']:.4f}" in lines["eval"]
    assert manifest(runs["eval-sliding"])["config_sha256"][:8] in lines["eval"]
    for stage, line in lines.items():
        assert line.rstrip("│ ").endswith("ok"), stage


def test_json_lists_the_lineage_with_figures_and_verified_flags(runs, capsys):
    code, out, _ = pgolf(capsys, "show", runs["submission"], "--json")
    assert code == 0
    result = json.loads(out)
    assert result["verified"] is True and result["plots"] == []
    (shown,) = result["outputs"]
    assert shown["stage"] == "bundle" and shown["verified"] is True
    rows = {row["stage"]: row for row in shown["lineage"]}
    assert [row["stage"] for row in shown["lineage"]] == [*LINEAGE, "bundle"]
    assert all(row["verified"] and not row["problems"] for row in rows.values())
    assert rows["eval"]["dir"] == str(runs["eval-sliding"])  # the bundled eval, not another eval of the blob
    bundle = manifest(runs["submission"])
    assert rows["bundle"]["config_sha256"] == bundle["config_sha256"]
    assert rows["bundle"]["created"] == bundle["created"]
    assert rows["bundle"]["figures"]["margin"] == ARTIFACT_BYTE_LIMIT - bundle["metrics"]["bytes_total"]
    # With a bundle in the chain the blob's margin counts its real code, not quantize's allowance.
    assert rows["compress"]["figures"]["code_bytes"] == bundle["metrics"]["bytes_code"]
    assert rows["compress"]["figures"]["margin"] == ARTIFACT_BYTE_LIMIT - bundle["metrics"]["bytes_total"]
    assert rows["train"]["figures"]["steps"] == STEPS
    assert rows["tokenize"]["figures"]["vocab_size"] == 1024


def test_several_evals_side_by_side_sorted_by_bpb(runs, capsys):
    evals = [runs["eval-flat"], runs["eval-sweep"], runs["eval-sliding"]]
    code, out, err = pgolf(capsys, "show", *evals, "--sort", "bpb", "--json")
    assert code == 0
    outputs = json.loads(out)["outputs"]
    bpbs = {Path(item["path"]): manifest(Path(item["path"]))["metrics"]["val_bpb"] for item in outputs}
    assert [Path(item["path"]) for item in outputs] == sorted(evals, key=bpbs.get)
    assert "3 outputs" in err
    rows = [line for line in err.splitlines() if line.startswith("│") and " eval " in line]
    assert len(rows) == 3  # one row per output, side by side
    assert all(f"compress {manifest(runs['blob'])['config_sha256'][:8]}" in row for row in rows)
    sweep = next(row for row in rows if "eval-sweep" in row)
    best = min(manifest(runs["eval-sweep"])["metrics"]["sweep"], key=lambda point: point["val_bpb"])
    assert "n-gram sweep of 4" in sweep and f"sweep best {best['val_bpb']:.4f}" in sweep
    code, out, _ = pgolf(capsys, "show", *evals, "--json")  # no --sort: the order given
    assert [Path(item["path"]) for item in json.loads(out)["outputs"]] == evals


def test_a_tampered_output_is_flagged_and_exits_3(runs, capsys, flipped):
    flipped(runs["blob"] / "model.blob")
    code, out, err = pgolf(capsys, "show", runs["eval-flat"], "--json")
    assert code == 3
    rows = {row["stage"]: row for row in json.loads(out)["outputs"][0]["lineage"]}
    assert rows["compress"]["problems"] == ["MISMATCH model.blob"] and not rows["compress"]["verified"]
    assert rows["compress"]["outputs_verified"] is False
    assert all(row["verified"] for stage, row in rows.items() if stage != "compress")
    assert "MISMATCH model.blob" in err
    assert err.splitlines()[-1] == f"error: {runs['blob']}: MISMATCH model.blob (see the digests column)"


def test_plots_leave_out_an_output_that_no_longer_verifies(runs, tmp_path, capsys, flipped):
    flipped(runs["train"] / "train_log.jsonl", offset=0)  # not even JSON now
    code, out, err = pgolf(capsys, "show", runs["eval-sweep"], "--plot-dir", tmp_path, "--json")
    assert code == 3
    assert json.loads(out)["plots"] == [str(tmp_path / "q.bytes.png"), str(tmp_path / "eval-sweep.sweep.png")]
    assert f"warning: {runs['train']}: not plotted, its outputs no longer match its manifest" in err
    assert not (tmp_path / "train.curves.png").exists()


def test_a_changed_input_is_flagged_on_the_stage_that_read_it(runs, capsys, flipped):
    flipped(runs["train"] / "model.safetensors", offset=-100)
    code, out, err = pgolf(capsys, "show", runs["eval-sliding"], runs["eval-flat"], "--json")
    assert code == 3
    for shown in json.loads(out)["outputs"]:
        rows = {row["stage"]: row for row in shown["lineage"]}
        assert rows["train"]["problems"] == ["MISMATCH model.safetensors"]
        assert rows["quantize"]["problems"] == ["MISMATCH input model.safetensors"]
        assert rows["quantize"]["outputs_verified"] and not rows["quantize"]["verified"]  # its own files still hold
        assert rows["eval"]["verified"] and rows["tokenize"]["verified"]
    assert "train: MISMATCH model.safetensors; quantize: MISMATCH input model.safetensors" in err


def test_a_path_that_is_not_a_pgolf_output_is_one_line_and_exit_3(runs, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a stage output")
    code, out, err = pgolf(capsys, "show", runs["eval-flat"], tmp_path)
    assert code == 3 and out == ""
    assert err.splitlines() == [f"error: {tmp_path}: no manifest.json (not a pgolf stage output, or the stage did "
                                f"not finish)"]
    code, _, err = pgolf(capsys, "show", tmp_path / "missing")
    assert code == 3 and err.splitlines() == [f"error: {tmp_path / 'missing'}: no such directory (give a pgolf "
                                              f"stage output directory)"]
    code, _, err = pgolf(capsys, "show", runs["eval-flat"], "--sort", "size")
    assert code == 2 and "--sort must be one of bpb, created" in err


def png_pixels(path: Path):
    from matplotlib.image import imread

    return imread(path)


def test_plots_are_written_beside_the_outputs_and_into_plot_dir(runs, tmp_path, capsys):
    code, out, err = pgolf(capsys, "show", runs["eval-sweep"], "--plot", "--json")
    assert code == 0
    run = runs["train"].parent
    expected = [run / "train.curves.png", run / "q.bytes.png", run / "eval-sweep.sweep.png"]
    assert [Path(p) for p in json.loads(out)["plots"]] == expected
    for path in expected:
        assert f"wrote {path}" in err
        assert png_pixels(path).shape[:2] == PIXELS
    code, _, _ = pgolf(capsys, "show", runs["eval-sweep"], "--plot")  # its own PNGs: replaced
    assert code == 0
    plots = tmp_path / "plots"
    code, out, _ = pgolf(capsys, "show", runs["train"], runs["train2"], "--plot-dir", plots, "--json")
    assert code == 0 and json.loads(out)["plots"] == [str(plots / "train.curves.png")]  # overlaid, one PNG
    assert png_pixels(plots / "train.curves.png").shape[:2] == PIXELS


def test_pgolf_never_overwrites_a_file_it_did_not_write(runs, tmp_path, capsys):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "q.bytes.png").write_bytes(b"someone's own figure")
    code, _, err = pgolf(capsys, "show", runs["q"], "--plot-dir", plots)
    assert code == 3 and "q.bytes.png: exists and was not written by pgolf show" in err
    assert (plots / "q.bytes.png").read_bytes() == b"someone's own figure"
    assert sorted(path.name for path in plots.iterdir()) == ["q.bytes.png"]  # and nothing else written


def test_plot_without_matplotlib_names_the_extra(runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = pgolf(capsys, "show", runs["eval-flat"], "--plot")
    assert code == 2 and out == ""
    assert err.splitlines() == ["error: --plot needs matplotlib, which is not installed: pip install "
                                "'pgolf[plot]'"]


def test_plot_figures_hold_the_runs_grid_and_groups(runs):
    logs = [(name, read_train_log(runs[name] / "train_log.jsonl")) for name in ("train", "train2")]
    figure = train_curves(logs)
    loss_axes, val_axes = figure.axes
    assert [len(line.get_xdata()) for line in loss_axes.get_lines()] == [STEPS, 4]
    assert list(val_axes.get_lines()[0].get_xdata()) == [4, STEPS]  # val_every = 4
    sweep = manifest(runs["eval-sweep"])["metrics"]["sweep"]
    figure = sweep_heatmap(sweep, "sweep")
    assert len(figure.axes) == 2  # the heat map and its colour bar
    grid = figure.axes[0].get_images()[0].get_array()
    point = next(p for p in sweep if p["order"] == 3 and p["alpha"] == 0.1)
    assert grid.shape == (2, 2) and grid[1][0] == pytest.approx(point["val_bpb"])
    tensors = manifest(runs["q"])["metrics"]["tensors"]
    figure = quantized_bytes(tensors, "bytes")
    (axes,) = figure.axes
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert labels == ["block 0", "block 1", "embedding", "skip_weights"]
    heights = {}
    for bars in axes.containers:
        for label, bar in zip(labels, bars, strict=True):
            heights[label] = heights.get(label, 0) + bar.get_height()
    assert heights["embedding"] == tensors["tok_emb.weight"]["bytes"]
    assert sum(heights.values()) == sum(row["bytes"] for row in tensors.values())


def test_a_gone_input_is_noted_and_a_changed_one_is_a_mismatch(runs, tmp_path, capsys):
    """A corpus deleted after tokenizing is the usual case, not tampering: noted in yellow, exit 0. A corpus
    that is there but differs is a mismatch (exit 3)."""
    corpus = write_demo_corpus(tmp_path, ["first document", "second document", "third document"])
    out = tmp_path / "data"
    assert run_main("tokenize", corpus, "--tokenizer", runs["data"] / TOKENIZER_NAME, "--val-docs", 1,
                    "--out", out) == 0
    corpus.unlink()
    code, out_json, err = pgolf(capsys, "show", out, "--json")
    # Its tokenizer came from the suite's tokenize output: that is its lineage.
    row, tokenizer_source = json.loads(out_json)["outputs"][0]["lineage"]
    assert tokenizer_source["dir"] == str(runs["data"]) and tokenizer_source["verified"]
    assert code == 0 and row["verified"] and row["notes"] == [f"gone {corpus.name}"]
    assert f"ok; gone {corpus.name}" in err
    write_demo_corpus(tmp_path, ["another first document"])
    code, out_json, _ = pgolf(capsys, "show", out, "--json")
    row, _ = json.loads(out_json)["outputs"][0]["lineage"]
    assert code == 3 and row["problems"] == [f"MISMATCH input {corpus.name}"]


def test_a_moved_run_folder_keeps_its_lineage(runs, tmp_path, capsys):
    """Inputs are found again by their paths relative to the stage, so a run folder moved whole still shows."""
    run = runs["train"].parent
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    try:
        code, out, _ = pgolf(capsys, "show", moved / "eval-flat", "--json")
    finally:
        shutil.move(moved, run)
    rows = json.loads(out)["outputs"][0]["lineage"]
    assert code == 0 and [row["stage"] for row in rows] == LINEAGE
    assert rows[2]["dir"] == str(moved / "q")


def test_the_heat_map_puts_tilt_points_beside_the_cache():
    sweep = [{"kind": "ngram", "name": "ngram3_a0.2_entropy", "val_bpb": 1.30},
             {"kind": "tilt", "name": "tilt8_b0.5_t0.8_m2", "val_bpb": 1.31},
             {"kind": "tilt", "name": "tilt12_b0.5_t0.8_m2", "val_bpb": 1.32}]
    axes = sweep_heatmap(sweep, "sweep").axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["ngram 3", "tilt 8", "tilt 12"]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["a0.2_entropy", "b0.5_t0.8_m2"]
    grid = np.ma.filled(axes.get_images()[0].get_array(), np.nan)  # empty cells are masked NaN
    assert grid[2][1] == pytest.approx(1.32) and grid[0][0] == pytest.approx(1.30)
    assert np.isnan(grid[0][1]) and np.isnan(grid[1][0])
