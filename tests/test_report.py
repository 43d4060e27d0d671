"""t distribution against closed forms and tables, the one-sample and Welch tests, and `pgolf report`."""

import json
import math
import shutil

import pytest

from pgolf.artifacts import StageOutput, atomic_write_bytes, sha256_json
from pgolf.stats import (
    mean_and_std,
    one_sample_t_test,
    regularized_incomplete_beta,
    student_t_cdf,
    welch_t_test,
)
from tests.test_codecs import run_cli

RATIO = 0.5904  # bpb per nat of these made-up runs (tokens per byte / ln 2)


@pytest.mark.parametrize("t", [-40.0, -2.92, -1.0, -0.1, 0.0, 0.7, 3.5])
def test_t_cdf_matches_closed_forms(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    # dof 4: F(t) = 1/2 + (3/4) s (1 - s^2/3), s = t / sqrt(4 + t^2)
    s = t / math.sqrt(4 + t * t)
    assert student_t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * s * (1 - s * s / 3), abs=1e-13)


@pytest.mark.parametrize("t, dof, p", [
    (-2.920, 2, 0.05), (-6.965, 2, 0.01), (-2.764, 10, 0.01), (-1.812, 10, 0.05), (-2.485, 25, 0.01),
])
def test_t_cdf_matches_table_critical_values(t, dof, p):
    assert student_t_cdf(t, dof) == pytest.approx(p, abs=2e-4)


def test_t_cdf_tends_to_the_normal():
    assert student_t_cdf(-1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)


def test_incomplete_beta_identities():
    for x in (0.0, 0.01, 0.3, 0.5, 0.93, 1.0):
        assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-14)
        assert regularized_incomplete_beta(2.5, 0.5, x) == pytest.approx(
            1 - regularized_incomplete_beta(0.5, 2.5, 1 - x), abs=1e-14)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(1, 1, 1.5)


def test_one_sample_test_by_hand():
    result = one_sample_t_test([1.10, 1.11, 1.12], reference=1.2244, min_improvement=0.005)
    t = (1.11 - 1.2194) / (0.01 / math.sqrt(3))
    assert result["t"] == pytest.approx(t) and result["dof"] == 2
    assert result["p_value"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    assert one_sample_t_test([1.2], 1.2244)["p_value"] is None  # one run: no std, no test
    worse = one_sample_t_test([1.30, 1.31, 1.32], reference=1.2244)
    assert worse["p_value"] > 0.99


def test_welch_dof_and_symmetry():
    ours, theirs = [1.10, 1.11, 1.12], [1.20, 1.21, 1.22]
    result = welch_t_test(ours, theirs)
    assert result["dof"] == pytest.approx(4.0)  # equal variances and sizes: 2(n - 1)
    assert result["t"] == pytest.approx(-0.1 / math.sqrt(2 * 0.01**2 / 3))
    assert result["p_value"] == pytest.approx(1 - welch_t_test(theirs, ours)["p_value"])
    unequal = welch_t_test([1.0, 1.1, 1.3, 0.9], [1.5, 1.51])
    v1, v2 = mean_and_std([1.0, 1.1, 1.3, 0.9])[1] ** 2 / 4, mean_and_std([1.5, 1.51])[1] ** 2 / 2
    assert unequal["dof"] == pytest.approx((v1 + v2) ** 2 / (v1**2 / 3 + v2**2 / 1))


def write_stage(out, stage, config, metrics, inputs=(), files=None):
    """A stage output whose files hold their own path (each one distinct), or the content given as
    {name: (role, content)}."""
    with StageOutput(out, stage, argv=["test"], config=config) as output:
        for path, role in inputs:
            output.add_input(path, role)
        for name, role in (files or {"out.bin": "data"}).items():
            role, content = role if isinstance(role, tuple) else (role, str(out / name))
            atomic_write_bytes(output.add_output(name, role), content.encode())
        output.metrics = metrics
        output.finalize()
    return out


def eval_run(root, seed: int, val_loss: float, blob_bytes: int = 15_000_000, val_shard=None, config=None):
    """train -> quantize -> compress -> eval directories, each manifest's inputs naming the one before (and
    the eval's naming `val_shard`, when given, as what it scored)."""
    pre_quant = {"val_loss": val_loss - 0.01, "val_bpb": (val_loss - 0.01) * RATIO}
    log = json.dumps({"event": "final", "weights": "master", **pre_quant}) + "\n"
    train = write_stage(root / "train", "train", {"train": {"seed": seed}},
                        {**pre_quant, "weights": "master", "steps": 820, "ms_per_step": 366.0},
                        files={"model.safetensors": "checkpoint", "train_log.jsonl": ("log_jsonl", log)})
    quantize = write_stage(root / "q", "quantize", {}, {}, [(train / "model.safetensors", "checkpoint")],
                           {"quantized.safetensors": "quantized"})
    blob = write_stage(root / "blob", "compress", {}, {"bytes": blob_bytes},
                       [(quantize / "quantized.safetensors", "quantized")], {"model.blob": "blob"})
    scored = [(val_shard, "val_shard")] if val_shard else []
    score = {"val_loss": val_loss, "val_bpb": val_loss * RATIO}
    return write_stage(root / "eval", "eval", config or {}, score,
                       [(blob / "manifest.json", "artifact_manifest"), *scored],
                       {"results.json": ("results", json.dumps(score))})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    scores = ((1337, 2.01), (42, 2.02), (7, 2.03))
    return [eval_run(root / f"seed{seed}", seed, loss) for seed, loss in scores]


def test_report_against_a_reference_value(runs, tmp_path, capsys):
    out = tmp_path / "report"
    result = run_cli(capsys, "report", *runs, "--reference", 1.2244, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    fields = json.loads((out / "submission.json").read_text())
    assert fields == summary["submission"]
    assert fields["val_loss"] == pytest.approx(2.02) and fields["val_bpb"] == pytest.approx(2.02 * RATIO)
    assert fields["val_loss_std"] == pytest.approx(0.01)
    assert fields["val_bpb_std"] == pytest.approx(0.01 * RATIO)
    assert fields["seeds"] == [1337, 42, 7] and fields["n_seeds"] == 3
    assert fields["seed_results"]["42"] == {"val_loss": 2.02, "val_bpb": 2.02 * RATIO, "steps": 820,
                                            "ms_per_step": 366.0, "bytes_model": 15_000_000}
    nats = one_sample_t_test([2.01, 2.02, 2.03], 1.2244 / RATIO, 0.005)
    assert fields["p_value"] == pytest.approx(nats["p_value"])
    assert summary["tests"]["bpb"]["threshold"] == pytest.approx(1.2244 - 0.005 * RATIO)
    assert summary["tests"]["bpb"]["p_value"] == pytest.approx(nats["p_value"])  # same test, rescaled


def test_report_against_reference_runs_uses_welch(runs, tmp_path, capsys):
    baseline = [eval_run(tmp_path / f"base{seed}", seed, loss) for seed, loss in ((1, 2.07), (2, 2.09))]
    result = run_cli(capsys, "report", *runs, "--reference-runs", baseline[0],
                     "--reference-runs", baseline[1], "--json")
    assert result.returncode == 0, result.stderr
    nats = json.loads(result.stdout)["tests"]["nats"]
    expected = welch_t_test([2.01, 2.02, 2.03], [2.07, 2.09], 0.005)
    assert nats["test"] == "Welch t" and nats["p_value"] == pytest.approx(expected["p_value"])
    assert nats["dof"] == pytest.approx(expected["dof"]) and not (tmp_path / "report").exists()


def test_report_on_train_dirs_and_refusals(runs, tmp_path, capsys):
    train_dirs = [run.parent / "train" for run in runs]
    pre = run_cli(capsys, "report", *train_dirs, "--json")
    assert pre.returncode == 0 and json.loads(pre.stdout)["submission"]["val_loss"] == pytest.approx(2.01)

    mixed = run_cli(capsys, "report", runs[0], train_dirs[1])
    assert mixed.returncode == 2 and "compare like with like" in mixed.stderr
    both = run_cli(capsys, "report", *runs, "--reference", 1.2, "--reference-runs", runs[0])
    assert both.returncode == 2

    no_score = write_stage(tmp_path / "noscore", "eval", {}, {"val_loss": 2.0},
                           files={"results.json": ("results", json.dumps({"val_loss": 2.0}))})
    missing = run_cli(capsys, "report", no_score)
    assert missing.returncode == 3 and "results.json: val_bpb is None, not a score" in missing.stderr
    wrong_stage = write_stage(tmp_path / "blob", "compress", {}, {})
    assert run_cli(capsys, "report", wrong_stage).returncode == 3


def test_report_refuses_runs_that_are_not_independent_samples_of_one_measurement(runs, tmp_path, capsys):
    twice = run_cli(capsys, "report", runs[0], runs[1], runs[0])
    assert twice.returncode == 3 and "given twice in RUN_DIRs" in twice.stderr
    same_seed = eval_run(tmp_path / "again", 1337, 2.00)
    result = run_cli(capsys, "report", runs[0], same_seed)
    assert result.returncode == 3 and "has seed 1337, as" in result.stderr and "not independent" in result.stderr
    val_a, val_b = tmp_path / "val_a.bin", tmp_path / "val_b.bin"
    val_a.write_bytes(b"validation A")
    val_b.write_bytes(b"validation B")
    on_a = eval_run(tmp_path / "a", 1, 2.0, val_shard=val_a)
    on_b = eval_run(tmp_path / "b", 2, 2.0, val_shard=val_b)
    result = run_cli(capsys, "report", on_a, on_b)
    assert result.returncode == 3 and "were scored on different validation data or tokenizers" in result.stderr
    result = run_cli(capsys, "report", runs[0], runs[1], "--reference-runs", on_a, "--reference-runs", on_b)
    assert result.returncode == 3  # the reference group itself mixes validation sets
    sliding = eval_run(tmp_path / "s", 3, 2.0, config={"eval": {"sliding_stride": 64}})
    result = run_cli(capsys, "report", runs[0], sliding)
    assert result.returncode == 3 and "were evaluated with different settings" in result.stderr
    budgeted = eval_run(tmp_path / "t", 4, 2.0, config={"eval": {"time_budget_seconds": 600.0, "budget_gpus": 8}})
    assert run_cli(capsys, "report", runs[0], budgeted).returncode == 0  # a time budget never changes a score
    overlap = run_cli(capsys, "report", runs[0], runs[1], "--reference-runs", runs[1], "--reference-runs", runs[2])
    assert overlap.returncode == 2 and "is both a RUN_DIR and a --reference-runs entry" in overlap.stderr
    flat_reference = run_cli(capsys, "report", sliding, "--reference-runs", runs[1])
    assert flat_reference.returncode == 3 and "were evaluated with other settings" in flat_reference.stderr


def test_two_evaluations_of_one_blob_are_one_sample_even_without_their_train_run(runs, tmp_path, capsys):
    run = eval_run(tmp_path / "r", 5, 2.0)
    again = write_stage(tmp_path / "again", "eval", {}, {"val_loss": 2.0, "val_bpb": 2.0 * RATIO},
                        [(run.parent / "blob" / "manifest.json", "artifact_manifest")],
                        {"results.json": ("results", json.dumps({"val_loss": 2.0, "val_bpb": 2.0 * RATIO}))})
    shutil.move(run.parent / "train", tmp_path / "moved-away")  # no seed to compare any more
    result = run_cli(capsys, "report", run, again, "--reference", 3.0)
    assert result.returncode == 3 and "scored the same weights as" in result.stderr and "one sample" in result.stderr


def test_a_score_edited_in_the_manifest_with_its_digest_recomputed_is_refused(runs, tmp_path, capsys):
    run = eval_run(tmp_path / "r", 5, 2.0)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["metrics"]["val_bpb"] = 1.0
    manifest["metrics_sha256"] = sha256_json(manifest["metrics"])  # a consistent-looking edit
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(capsys, "report", run)
    assert result.returncode == 3 and "metric val_bpb 1.0 differs from" in result.stderr
    assert "results.json (edited after the stage ran)" in result.stderr


@pytest.mark.parametrize("flags, message", [(("--reference", "nan"), "--reference must be a positive number"),
                                            (("--reference", "inf"), "--reference must be a positive number"),
                                            (("--reference-nats", "-1"), "--reference-nats must be a positive"),
                                            (("--significance", "1.5"), "--significance must be in (0, 1)")])
def test_report_refuses_meaningless_references(runs, capsys, flags, message):
    result = run_cli(capsys, "report", *runs, *flags)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_report_states_a_verdict_at_the_significance_level(runs, capsys):
    passed = run_cli(capsys, "report", *runs, "--reference-nats", 2.2, "--json")
    verdict = json.loads(passed.stdout)["verdict"]
    assert verdict["passed"] is True and verdict["significance"] == 0.01 and verdict["p_value"] < 0.01
    assert "verdict: PASS (nats test: p = " in passed.stderr and "< 0.01" in passed.stderr
    failed = run_cli(capsys, "report", *runs, "--reference-nats", 2.03, "--json")
    assert json.loads(failed.stdout)["verdict"]["passed"] is False and "verdict: FAIL" in failed.stderr
    loose = run_cli(capsys, "report", *runs, "--reference-nats", 2.045, "--significance", 0.2, "--json")
    p_value = json.loads(loose.stdout)["verdict"]["p_value"]
    assert 0.01 < p_value < 0.2 and json.loads(loose.stdout)["verdict"]["passed"] is True
    single = run_cli(capsys, "report", runs[0], "--reference-nats", 2.2, "--json")
    assert json.loads(single.stdout)["verdict"]["passed"] is None and "verdict: undecided" in single.stderr


def test_equal_scores_give_a_decided_test_without_infinities(tmp_path, capsys):
    equal = [eval_run(tmp_path / f"r{seed}", seed, 2.0) for seed in (1, 2)]
    result = run_cli(capsys, "report", *equal, "--reference-nats", 2.2, "--out", tmp_path / "report", "--json")
    assert result.returncode == 0, result.stderr
    nats = json.loads(result.stdout)["tests"]["nats"]
    assert nats["t"] is None and nats["p_value"] == 0.0 and "t = infinite (no spread)" in result.stderr
