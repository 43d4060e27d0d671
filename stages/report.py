"""`pgolf report RUN...`: parse, run pgolf.report.report, print (the verdict and each test's line)."""

from pathlib import Path

import typer

from pgolf import log
from pgolf.report import report as run_report
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report


def verdict_line(result: dict) -> str:
    if result["passed"] is None:
        return f"verdict: undecided (one run gives no p-value; the challenge asks for p < {result['significance']:g})"
    word, relation = ("PASS", "<") if result["passed"] else ("FAIL", ">=")
    return (f"verdict: {word} (nats test: p = {result['p_value']:.3g} {relation} {result['significance']:g}, "
            f"the stated significance level)")


def significance_line(unit: str, test: dict) -> str:
    if test["p_value"] is None:
        return f"{unit}: mean {test['mean']:.6f} vs threshold {test['threshold']:.6f}: p undefined (one run)"
    t = "infinite (no spread)" if test["t"] is None else f"{test['t']:.3f}"
    dof = "" if test["dof"] is None else f", dof = {test['dof']:.2f}"
    return (f"{unit}: mean {test['mean']:.6f} vs threshold {test['threshold']:.6f}, {test['test']}: "
            f"t = {t}{dof}, one-sided p = {test['p_value']:.3g}")


def report_runs(
    run_dirs: list[Path] = typer.Argument(..., help="Eval (or train) output directories, one per seed."),
    reference: float = typer.Option(None, "--reference", help="Reference val_bpb to beat (e.g. 1.2244)."),
    reference_nats: float = typer.Option(None, "--reference-nats", help="Reference val_loss (nats) to beat."),
    reference_runs: list[Path] = typer.Option(None, "--reference-runs", help="Reference runs (Welch test)."),
    min_improvement_nats: float = typer.Option(0.005, "--min-improvement-nats", help="Required margin."),
    significance_level: float = typer.Option(0.01, "--significance", help="Significance level of the verdict "
                                             "(the challenge's 0.01)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write submission.json + manifest here."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Mean, std and one-sided t-test (H1: mean < reference - margin) over seeds, in nats and bpb.

    Example: pgolf report artifacts/seed*/eval --reference 1.2244 --out artifacts/report
    """
    result = run_report(run_dirs, reference=reference, reference_nats=reference_nats,
                        reference_runs=reference_runs or [], min_improvement_nats=min_improvement_nats,
                        significance_level=significance_level, out=out, force=force, log=log).metrics
    fields, tests, decision = result["submission"], result["tests"], result["verdict"]
    lines = [f"{key}: val_loss {r['val_loss']:.6f}  val_bpb {r['val_bpb']:.6f}"
             for key, r in fields["seed_results"].items()]
    lines.append(f"mean over {len(result['runs'])}: val_loss {fields['val_loss']:.6f}  "
                 f"val_bpb {fields['val_bpb']:.6f}"
                 + (f"  (std {fields['val_loss_std']:.6f} / {fields['val_bpb_std']:.6f})"
                    if fields["val_bpb_std"] is not None else ""))
    lines += [significance_line(unit, test) for unit, test in tests.items()]
    if decision is not None:
        lines.append(verdict_line(decision))
    report(result, as_json, lines, out)


def register(app: typer.Typer) -> None:
    app.command("report")(report_runs)
