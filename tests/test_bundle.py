"""`pgolf bundle`: the inliner's rules (unique names, plain pgolf imports, allowed packages, pruning) and the
real pipeline: train -> quantize -> compress -> eval -> bundle, then the bundled train_gpt.py run where pgolf
is NOT importable, scoring the blob exactly as `pgolf eval` does, plain and self-extracting."""

import ast
import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import pgolf.bundle as bundle_core
from pgolf.artifacts import read_manifest
from pgolf.bundle import (
    CODE_LITERALS,
    SUBMISSION_BLOB,
    bundle_source,
    extracted_source,
    latin1_literal,
    left_out,
    minified_source,
    modules_in_order,
    self_extracting,
)
from pgolf.codecs import read_blob, read_blob_header
from pgolf.errors import InvalidInput
from tests.demo_data import demo_tokenizer_bytes
from tests.test_codecs import run_cli, run_main
from tests.test_evaluate import BATCHED_TTT

# Environment variables that change which CPU kernels torch, oneDNN and MKL run.
CPU_KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                        "MKL_NUM_THREADS")
RESULT_LINE = re.compile(r"final_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")
RUN_TOML = """
[train]
iterations = 4
val_every = 0
checkpoint_every = 0
warmup_steps = 1
"""


def write_package(directory: Path, modules: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(source)
    return directory


def bundle_of(directory: Path, entry_module: str = "entry", entry: str = "main") -> str:
    return bundle_source({"answer": 42}, "test", entry=entry, entry_module=entry_module, directory=directory)


def test_inlines_in_dependency_order_and_prunes_what_the_entry_never_reaches(tmp_path):
    package = write_package(tmp_path / "pkg", {
        "entry": "import math\n\nfrom pgolf.helpers import double\n\n\ndef main(baked):\n"
                 "    print(double(baked['answer']), math.pi > 3)\n",
        "helpers": "from pgolf.base import BASE\n\n# why the constant exists\nSCALE = 2\n\n\n"
                   "def double(x):\n    return x * SCALE + BASE\n\n\ndef unused_helper():\n    return 1\n",
        "base": "import json\n\nBASE = 0\n\n\ndef never_called():\n    return json.dumps({})\n",
    })
    assert [m.name for m in modules_in_order("entry", package)] == ["base", "helpers", "entry"]
    source = bundle_of(package)
    assert "unused_helper" not in source and "never_called" not in source and "import json" not in source
    assert "from pgolf" not in source and "# why the constant exists" in source
    assert source.index("BASE = 0") < source.index("def double") < source.index("def main")
    script = tmp_path / "script.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, "-S", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "84 True\n", result.stderr


@pytest.mark.parametrize("modules, message", [
    ({"entry": "from pgolf.other import f\n\n\ndef main(baked):\n    f()\n\n\ndef helper():\n    pass\n",
      "other": "def f():\n    pass\n\n\ndef helper():\n    pass\n"}, "top-level name 'helper' is also bound"),
    ({"entry": "from pgolf.other import f\n\nLIMIT = 3\n\n\ndef main(baked):\n    f()\n",
      "other": "LIMIT = 4\n\n\ndef f():\n    pass\n"}, "top-level name 'LIMIT' is also bound"),
    ({"entry": "from pgolf.other import f\nimport numpy as np\n\n\ndef main(baked):\n    f(np)\n",
      "other": "import torch as np\n\n\ndef f(x):\n    pass\n"}, "top-level name 'np' is also bound"),
    ({"entry": "from pgolf.other import f as g\n\n\ndef main(baked):\n    g()\n",
      "other": "def f():\n    pass\n"}, "no `as`"),
    ({"entry": "def main(baked):\n    from pgolf.other import f\n    f()\n",
      "other": "def f():\n    pass\n"}, "must be at module top level"),
    ({"entry": "import pgolf.other\n\n\ndef main(baked):\n    pgolf.other.f()\n",
      "other": "def f():\n    pass\n"}, "`import pgolf...` cannot be inlined"),
    ({"entry": "from pgolf.other import f\n\n\ndef main(baked):\n    f()\n",
      "other": "from pgolf.entry import main\n\n\ndef f():\n    pass\n"}, "circular pgolf imports"),
    ({"entry": "import typer\n\n\ndef main(baked):\n    typer.echo(1)\n"}, "imports 'typer'"),
])
def test_bundling_rules_are_enforced(tmp_path, modules, message):
    package = write_package(tmp_path / "pkg", modules)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        bundle_of(package)


def test_same_imports_and_identical_constants_may_repeat(tmp_path):
    package = write_package(tmp_path / "pkg", {
        "entry": "from dataclasses import dataclass\n\nfrom pgolf.other import f\n\nBOS_ID = 1\n\n\n"
                 "def main(baked):\n    f(BOS_ID, dataclass)\n\n\ndef unused():\n    import typer\n",
        "other": "from dataclasses import dataclass, field\n\nBOS_ID = 1\n\n\ndef f(*args):\n    pass\n",
    })
    source = bundle_of(package)  # `import typer` sits in a pruned function: never shipped, never refused
    assert "typer" not in source


def test_the_real_core_bundles_without_pgolf():
    source = bundle_source({}, "pgolf core")
    assert "def submission_main" in source and "def score_stream" in source and "class GPT" in source
    assert not re.search(r"^\s*(from|import) pgolf", source, re.M)
    for bundler_only in ("def bundle_source", "def check_unique_names", "import ast"):
        assert bundler_only not in source  # the bundler half of pgolf/bundle.py is pruned away


# ---- the real pipeline -------------------------------------------------------------------------------------


def isolated_python(script_dir: Path, *args) -> subprocess.CompletedProcess:
    """Run python with site-packages on the path but no .pth processing (-S), so the editable pgolf install
    is not importable; cwd is the bundle directory. The variables that pick torch's CPU kernels pass through, so the
    script computes with the kernels `pgolf eval` in this process used (scores are compared to the last digit)."""
    env = {"PYTHONPATH": ":".join(site.getsitepackages()), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           **{k: v for k, v in os.environ.items() if k in CPU_KERNEL_VARIABLES}}
    return subprocess.run([sys.executable, "-S", *map(str, args)], capture_output=True, text=True,
                          cwd=script_dir, env=env)


@pytest.fixture(scope="module")
def pipeline(tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_run")
    config = root / "run.toml"
    config.write_text(RUN_TOML)
    steps = [
        ("train", tiny_data_dir, "--preset", "tiny", "--config", config, "--out", root / "train"),
        ("quantize", root / "train", "--plan", "int6", "--out", root / "q"),
        ("compress", root / "q", "--codec", "lzma", "--shuffle", "on", "--bitpack", "off",
         "--out", root / "blob"),
        ("eval", root / "blob", "--data", tiny_data_dir, "--out", root / "eval"),
    ]
    for step in steps:
        assert run_main(*step) == 0, step
    for name, extra in (("plain", ()), ("packed", ("--compress-code",)),
                        ("packed-safe", ("--compress-code", "--minify", "safe")),
                        ("packed-latin1", ("--compress-code", "--code-literal", "latin1"))):
        assert run_main("bundle", "--train", root / "train", "--blob", root / "blob", "--eval", root / "eval",
                        "--name", "Tiny pipeline", "--github-id", "tester", *extra, "--out", root / name) == 0
    return root


def script_result(directory: Path, data_dir: Path) -> tuple[str, str]:
    result = isolated_python(directory, "train_gpt.py", "eval", "--data", data_dir)
    assert result.returncode == 0, result.stderr
    return RESULT_LINE.search(result.stdout).groups()


def test_pgolf_is_not_importable_in_the_isolated_interpreter(tmp_path):
    imports = "import torch, numpy, sentencepiece, zstandard, brotli, safetensors; import pgolf"
    result = isolated_python(tmp_path, "-c", imports)
    assert result.returncode != 0 and "No module named 'pgolf'" in result.stderr


def test_bundled_eval_matches_pgolf_eval(pipeline, tiny_data_dir):
    metrics = read_manifest(pipeline / "eval")["metrics"]
    val_loss, val_bpb = script_result(pipeline / "plain", tiny_data_dir)
    assert (val_loss, val_bpb) == (f"{metrics['val_loss']:.8f}", f"{metrics['val_bpb']:.8f}")


@pytest.mark.parametrize("setting", ["ttt", "ngram", "tilt"])
def test_a_bundle_keeps_what_its_settings_use_and_scores_as_pgolf_eval(pipeline, tiny_data_dir, tmp_path, setting):
    flags = {"ttt": ["--ttt", "--ttt-config", tmp_path / "ttt.toml"],
             "ngram": ["--ngram-order", "3", "--alpha", "0.3", "--ngram-buckets", "1024"],
             "tilt": ["--tilt-order", "3", "--tilt-boost", "0.5", "--ngram-buckets", "1024"]}[setting]
    (tmp_path / "ttt.toml").write_text(BATCHED_TTT)
    assert run_main("eval", pipeline / "blob", "--data", tiny_data_dir, *flags, "--out", tmp_path / "eval") == 0
    assert run_main("bundle", "--train", pipeline / "train", "--blob", pipeline / "blob", "--eval", tmp_path / "eval",
                    "--name", "Tiny pipeline", "--github-id", "tester", "--out", tmp_path / "sub") == 0
    source = (tmp_path / "sub" / "train_gpt.py").read_text()
    plain = (pipeline / "plain" / "train_gpt.py").read_text()  # the same run, evaluated without either
    sweep = setting in ("ngram", "tilt")  # one sweep class scores the cache and the tilt
    for name, used in (("run_ttt", setting == "ttt"), ("tilt_logprobs", sweep), ("ngram_witten_bell", sweep)):
        assert (f"def {name}(" in source) == used, name
        assert f"def {name}(" not in plain, name
    assert "def ttt_pass(*args, **kwargs):  # left out of this bundle: its eval runs no TTT" in plain
    metrics = read_manifest(tmp_path / "eval")["metrics"]
    val_loss, val_bpb = script_result(tmp_path / "sub", tiny_data_dir)
    assert (val_loss, val_bpb) == (f"{metrics['val_loss']:.8f}", f"{metrics['val_bpb']:.8f}")


def test_a_bundle_keeps_the_model_features_its_config_turns_on(tiny_data_dir, tmp_path):
    """BigramHash, both SmearGates, value embeddings, XSA and document-isolated training on: the bundle keeps
    their code (a tiny run's does not), retrains through them and scores its blob as `pgolf eval`."""
    config = tmp_path / "features.toml"
    config.write_text(RUN_TOML + "isolate_documents = true\n[model]\nbigram_buckets = 64\nbigram_dim = 16\n"
                      "smear_gate = true\nsmear_gate_width = 4\nvalue_embed_layers = [1]\nvalue_embed_dim = 16\n"
                      "xsa_last_n = -1\n")
    steps = [("train", tiny_data_dir, "--preset", "tiny", "--config", config, "--out", tmp_path / "train"),
             ("quantize", tmp_path / "train", "--plan", "int6", "--out", tmp_path / "q"),
             ("compress", tmp_path / "q", "--out", tmp_path / "blob"),
             ("eval", tmp_path / "blob", "--data", tiny_data_dir, "--out", tmp_path / "eval"),
             ("bundle", "--train", tmp_path / "train", "--blob", tmp_path / "blob", "--eval", tmp_path / "eval",
              "--name", "features", "--github-id", "tester", "--out", tmp_path / "sub")]
    for step in steps:
        assert run_main(*step) == 0, step
    source = (tmp_path / "sub" / "train_gpt.py").read_text()
    for feature in ("class BigramHash(", "class SmearGate(", "class TokenSmearGate(", "class ValueEmbedding(",
                    "def remove_self_value(", "def document_mask("):
        assert feature in source, feature
    metrics = read_manifest(tmp_path / "eval")["metrics"]
    assert script_result(tmp_path / "sub", tiny_data_dir) == (f"{metrics['val_loss']:.8f}", f"{metrics['val_bpb']:.8f}")
    retrained = isolated_python(tmp_path / "sub", "train_gpt.py", "train", "--data", tiny_data_dir, "--out",
                                tmp_path / "again", "--iterations", "2")
    assert retrained.returncode == 0, retrained.stderr[-2000:]


def test_what_a_submission_leaves_out_follows_its_plan_and_eval():
    plan = {"name": "p", "default": "int6"}
    baked = {"plan": plan, "ttt": None, "eval": {"ngram_order": [], "tilt_order": []}}
    gptq, lqer = {"gptq_levels", "gptq_hessians", "collect_hessians"}, \
        {"lqer_factors", "lqer_quantize_factor", "lqer_restore_factor"}
    features = {"BigramHash", "SmearGate", "TokenSmearGate", "ValueEmbedding", "remove_self_value", "document_mask"}
    assert set(left_out(baked)) == {"ttt_pass", "NgramSweep", "demotion_order", "fit_plan_to_target", "fit_clip_k",
                                    "gptq_sdclip_levels", "prune_candidates", "fit_prune", "pruned_state",
                                    "generated_windows", *gptq, *lqer, *features}
    record = {"plan": {**plan, "clip": "gptq-sdclip", "fit": "clip-k+prune", "lqer_top_k": 2},
              "quantize": {"calibration": "generated"},
              "ttt": {"mode": "batched"}, "eval": {"ngram_order": [3], "tilt_order": []},
              "model": {"bigram_buckets": 4096, "smear_gate": True, "smear_gate_width": 12, "value_embed_layers": [9],
                        "xsa_last_n": -1}, "train": {"isolate_documents": True}}
    assert set(left_out(record)) == {"demotion_order", "fit_plan_to_target"}
    demote = {**baked, "plan": {**plan, "demote": "center-out", "demote_to": "int5"}}
    assert "fit_plan_to_target" not in left_out(demote) and "fit_clip_k" in left_out(demote)
    # GPTQ stays when the quantize config overrides the plan's clip, or when training collects Hessians.
    assert not gptq & set(left_out({**baked, "quantize": {"clip": "gptq"}}))
    assert not gptq & set(left_out({**baked, "train": {"gptq_calibration_batches": 16}}))
    for settings in (baked, record, demote):  # every combination bundles into a program that compiles
        compile(bundle_source({}, "t", stubs=left_out(settings)), "train_gpt.py", "exec")
    with pytest.raises(ValueError, match="bundle stubs no_such_function: no such top-level function"):
        bundle_source({}, "t", stubs={"no_such_function": "why"})


MINIFY_SAMPLE = '''"""Module docstring."""
# a comment line
import dataclasses
import json  # an inline comment
import typing

TEMPLATE = """keep # this: it is string content

    and this indented line, and the blank one above"""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Fields are read back by name: from dicts, and by typing.get_type_hints."""

    learning_rate: float = 0.5  # a field's name is data
    layer_count: int = 2


def only_doc():
    """Nothing but a docstring."""


def scaled(value: float, *, multiplier_of_the_value: float = 2.0) -> float:
    intermediate_result: float = value * multiplier_of_the_value
    return intermediate_result


class Names:
    """Class docstring
    over two lines."""

    def join(self, items):
        # why: a comment inside a body
        return f"{', '.join(items)}"  # 3.11-style f-string, quotes alternated


def configured(values: dict) -> Settings:
    hints = typing.get_type_hints(Settings)
    return Settings(**{name: hints[name](value) for name, value in values.items()})


RESULT = (only_doc(), scaled(3.0, multiplier_of_the_value=4.0), Names().join(["a", "b"]), TEMPLATE, json.dumps(1),
          dataclasses.asdict(configured({"learning_rate": "0.25", "layer_count": "3"})))
'''


@pytest.mark.parametrize("mode", ["rename", "safe"])
def test_minified_source_keeps_the_program_and_its_names_that_are_data(mode):
    minified = minified_source(MINIFY_SAMPLE, mode)
    original, shrunk = {}, {}
    exec(compile(MINIFY_SAMPLE, "sample", "exec"), original)
    exec(compile(minified, "sample", "exec"), shrunk)
    assert shrunk["RESULT"] == original["RESULT"] == (
        None, 12.0, "a, b", original["TEMPLATE"], "1", {"learning_rate": 0.25, "layer_count": 3})
    assert "comment" not in minified and "docstring" not in minified
    assert "learning_rate:float" in minified.replace(" ", "")  # a dataclass field keeps its name and annotation
    assert "multiplier_of_the_value" in minified  # a keyword argument keeps its name
    assert ("intermediate_result" in minified) == (mode == "safe")  # only `rename` shortens locals
    assert minified_source(MINIFY_SAMPLE, "off") == MINIFY_SAMPLE


def test_minified_f_strings_parse_on_python_3_11():
    """On 3.12+ python-minifier would print PEP 701 f-strings (a nested string in the outer quotes); the bundle
    keeps 3.11's rules so the script runs on every supported Python."""
    source = 'def f(items):\n    return f"{\'-\'.join(items)}" + f\'{"x"}\'\n\n\nRESULT = f(["a", "b"])\n'
    minified = minified_source(source, "rename")
    for node in ast.walk(ast.parse(minified)):
        if isinstance(node, ast.JoinedStr):
            quoted = ast.get_source_segment(minified, node).lstrip("rRfF")
            assert quoted[0] not in quoted[1:-1], quoted  # the outer quote never appears inside
    scope = {}
    exec(minified, scope)
    assert scope["RESULT"] == "a-bx"


@pytest.mark.parametrize("name, mode", [("packed", "rename"), ("packed-safe", "safe"), ("packed-latin1", "rename")])
def test_self_extracting_script_is_smaller_and_runs_identically(pipeline, tiny_data_dir, name, mode):
    plain = (pipeline / "plain" / "train_gpt.py").read_text()
    packed = (pipeline / name / "train_gpt.py").read_bytes()
    assert len(packed) < len(plain) / 4 and len(packed.splitlines()) == (4 if name == "packed-latin1" else 3)
    assert read_manifest(pipeline / name)["config"]["minify"] == mode
    shipped = extracted_source(packed)
    assert shipped == minified_source(plain, mode) and len(shipped) < 0.7 * len(plain)
    # No comments or docstrings survive: the counted bytes carry only the program.
    assert not any(line.lstrip().startswith("#") for line in shipped.splitlines())
    assert '"""' in plain and '"""' not in shipped
    metrics = read_manifest(pipeline / "eval")["metrics"]
    val_loss, val_bpb = script_result(pipeline / name, tiny_data_dir)
    assert (val_loss, val_bpb) == (f"{metrics['val_loss']:.8f}", f"{metrics['val_bpb']:.8f}")


def test_a_brotli_blob_s_script_packs_its_program_with_brotli_too(pipeline, tiny_data_dir, tmp_path):
    """brotli packs the minified program smaller than lzma (its text dictionary), but the script may import it
    only where it needs brotli anyway: for a brotli blob. The lzma blob's script (fixture) never imports it."""
    assert run_main("compress", pipeline / "q", "--codec", "brotli", "--out", tmp_path / "blob") == 0
    assert run_main("eval", tmp_path / "blob", "--data", tiny_data_dir, "--out", tmp_path / "eval") == 0
    assert run_main("bundle", "--train", pipeline / "train", "--blob", tmp_path / "blob", "--eval", tmp_path / "eval",
                    "--name", "x", "--github-id", "y", "--compress-code", "--out", tmp_path / "sub") == 0
    packed = (tmp_path / "sub" / "train_gpt.py").read_bytes()
    assert packed.splitlines()[0].endswith(b",brotli")
    assert not (pipeline / "packed" / "train_gpt.py").read_bytes().splitlines()[0].endswith(b",brotli")
    source = extracted_source(packed)
    assert len(packed) < len(self_extracting(source))  # smaller than the lzma / zlib candidates
    metrics = read_manifest(tmp_path / "eval")["metrics"]
    val_loss, val_bpb = script_result(tmp_path / "sub", tiny_data_dir)
    assert (val_loss, val_bpb) == (f"{metrics['val_loss']:.8f}", f"{metrics['val_bpb']:.8f}")


def test_renamed_script_is_smaller_than_the_safe_one(pipeline):
    sizes = {name: (pipeline / name / "train_gpt.py").stat().st_size for name in ("packed", "packed-safe")}
    assert sizes["packed"] < sizes["packed-safe"]


def test_a_latin1_literal_ships_the_same_program_in_fewer_bytes(pipeline):
    """The compressed program's bytes as a latin-1 string literal (~2 % escapes) instead of base85 (+25 %)."""
    base85, latin1 = ((pipeline / name / "train_gpt.py").read_bytes() for name in ("packed", "packed-latin1"))
    assert extracted_source(latin1) == extracted_source(base85)
    assert len(latin1) < 0.85 * len(base85)
    assert read_manifest(pipeline / "packed-latin1")["metrics"]["bytes_code"] == len(latin1)


def test_every_byte_value_survives_the_latin1_literal_through_pythons_source_reader(tmp_path):
    """NUL, CR and LF (Python's reader would drop NUL and turn CR into LF), the quote, the backslash and an escaped
    NUL before digits (a short octal escape would swallow them) come back as they went in."""
    data = bytes(range(256)) + b"\x0012\r\n\r'\\\x00" + bytes(range(255, -1, -1))
    script = tmp_path / "literal.py"
    script.write_bytes(b"#coding:l1\nimport sys\np=" + latin1_literal(data) +
                       b"\nsys.stdout.buffer.write(p.encode('l1'))\n")
    result = subprocess.run([sys.executable, script], capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == data, result.stderr


def test_code_literal_latin1_needs_compress_code_and_unknown_literals_are_refused(pipeline, tmp_path, capsys):
    common = ["bundle", "--train", pipeline / "train", "--blob", pipeline / "blob", "--name", "x", "--github-id", "y"]
    assert run_main(*common, "--code-literal", "latin1", "--out", tmp_path / "a") == 2
    assert "--code-literal latin1 applies to --compress-code only" in capsys.readouterr().err
    assert run_main(*common, "--compress-code", "--code-literal", "base64", "--out", tmp_path / "b") == 2
    assert "'base64' is not one of base85, latin1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def assert_short_traceback(stderr: str, inner_line: str | None = None) -> None:
    """A traceback from inside the self-extracting script: the program's frames, never the payload line."""
    assert "Traceback" in stderr and 'File "<train_gpt.py>", line' in stderr, stderr[-3000:]
    assert max(map(len, stderr.splitlines())) < 300 and len(stderr) < 10_000, stderr[-3000:]
    assert not re.search(r"[0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]{200}", stderr)  # no run of base85
    if inner_line is not None and sys.version_info >= (3, 13):  # 3.13's excepthook reads linecache
        assert inner_line in stderr


@pytest.mark.parametrize("literal", CODE_LITERALS)
def test_a_failing_self_extracting_script_keeps_its_payload_out_of_the_traceback(tmp_path, literal):
    program = "import os\n\n\ndef fail(path):\n    return os.listdir(path)\n\n\nfail('/no/such/dir')\n"
    script = tmp_path / "train_gpt.py"
    script.write_bytes(self_extracting(program + "# padding\n" * 4000, literal=literal))  # a long payload line
    result = isolated_python(tmp_path, script)
    assert result.returncode == 1 and "FileNotFoundError" in result.stderr
    assert_short_traceback(result.stderr, "return os.listdir(path)")


def test_a_failing_bundled_script_keeps_its_payload_out_of_the_traceback(pipeline, tiny_data_dir, tmp_path):
    (tmp_path / "a_file").write_text("")  # --out below a regular file: an error submission_main does not expect
    result = isolated_python(pipeline / "packed", "train_gpt.py", "train", "--data", tiny_data_dir,
                             "--iterations", 1, "--out", tmp_path / "a_file" / "out")
    assert result.returncode == 1 and "NotADirectoryError" in result.stderr, result.stderr[-3000:]
    assert_short_traceback(result.stderr)


def test_bundled_eval_under_torchrun_matches_one_process(pipeline, tiny_data_dir):
    """The challenge runs the submission under torchrun: two gloo ranks score what one process does, and every
    rank exits 0."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "train_gpt.py", "eval", "--data", str(tiny_data_dir)], cwd=pipeline / "packed",
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(RESULT_LINE.findall(result.stdout)) == 1  # rank 0 reports
    val_loss, val_bpb = RESULT_LINE.search(result.stdout).groups()
    metrics = read_manifest(pipeline / "eval")["metrics"]
    assert float(val_loss) == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert float(val_bpb) == pytest.approx(metrics["val_bpb"], rel=1e-6)


def test_submission_fields_and_counted_bytes(pipeline, capsys):
    for name in ("plain", "packed"):
        bundle = pipeline / name
        submission = json.loads((bundle / "submission.json").read_text())
        code_bytes = (bundle / "train_gpt.py").stat().st_size
        blob_bytes = (bundle / SUBMISSION_BLOB).stat().st_size
        assert (bundle / SUBMISSION_BLOB).read_bytes() == (pipeline / "blob" / "model.blob").read_bytes()
        assert submission["bytes_code"] == code_bytes and submission["bytes_model"] == blob_bytes
        assert submission["bytes_total"] == code_bytes + blob_bytes
        assert submission["name"] == "Tiny pipeline" and submission["github_id"] == "tester"
        assert submission["val_bpb"] == read_manifest(pipeline / "eval")["metrics"]["val_bpb"]
        assert submission["track"] == "10min_16mb"
        files = {p.name for p in bundle.iterdir()}
        assert {"README.md", "train.log", "train_log.jsonl", "eval_results.json"} <= files
        result = run_cli(capsys, "verify-size", bundle, "--json")
        assert result.returncode == 0
        assert json.loads(result.stdout)["total_bytes"] == submission["bytes_total"]


def test_bundled_train_retrains_and_exports_with_the_same_plan_and_codec(pipeline, tiny_data_dir, tmp_path):
    """The minified, renamed script retrains to the very bytes the plain one does."""
    outputs = {}
    for name in ("plain", "packed"):
        result = isolated_python(pipeline / name, "train_gpt.py", "train", "--data", tiny_data_dir,
                                 "--iterations", 2, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "Total submission size" in result.stdout and (tmp_path / name / "train.log").is_file()
        blob = (tmp_path / name / SUBMISSION_BLOB).read_bytes()
        outputs[name] = (RESULT_LINE.search(result.stdout).groups(), blob)
    assert outputs["packed"] == outputs["plain"]
    _, plan = read_blob(tmp_path / "packed" / SUBMISSION_BLOB)
    _, original = read_blob(pipeline / "blob" / "model.blob")
    assert {n: r["scheme"] for n, r in plan["tensors"].items()} == \
        {n: r["scheme"] for n, r in original["tensors"].items()}
    assert plan["model_config"] == original["model_config"]
    assert read_blob_header(outputs["packed"][1])["codec"] == "lzma"


def test_report_fields_and_the_cap(pipeline, tmp_path, capsys, monkeypatch):
    assert run_cli(capsys, "report", pipeline / "eval", "--out", tmp_path / "report").returncode == 0
    result = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob",
                     "--eval", pipeline / "eval", "--report", tmp_path / "report", "--name", "x",
                     "--github-id", "y", "--out", tmp_path / "with_report")
    assert result.returncode == 0, result.stderr
    submission = json.loads((tmp_path / "with_report" / "submission.json").read_text())
    assert submission["n_seeds"] == 1 and list(submission["seed_results"]) == ["1337"]
    assert submission["val_bpb"] == read_manifest(pipeline / "eval")["metrics"]["val_bpb"]

    monkeypatch.setattr(bundle_core, "ARTIFACT_BYTE_LIMIT", submission["bytes_model"])  # no room left for the code
    over = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob",
                   "--name", "x", "--github-id", "y", "--out", tmp_path / "over")
    assert over.returncode == 4 and "exceed the" in over.stderr and not (tmp_path / "over").exists()


def test_refuses_a_blob_from_another_run(pipeline, tiny_checkpoint_dir, tmp_path, capsys):
    other = run_cli(capsys, "bundle", "--train", tiny_checkpoint_dir, "--blob", pipeline / "blob",
                    "--name", "x", "--github-id", "y", "--out", tmp_path / "b")
    assert other.returncode == 3 and "was not made from" in other.stderr
    exists = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob",
                     "--name", "x", "--github-id", "y", "--out", pipeline / "plain")
    assert exists.returncode == 3 and "--force" in exists.stderr
    assert not (tmp_path / "b").exists()


def data_with_tokenizer(tiny_data_dir: Path, directory: Path, model: bytes) -> Path:
    """The val/train shards of the tiny data, manifest-less, beside another tokenizer file."""
    directory.mkdir()
    for shard in sorted(tiny_data_dir.glob("fineweb_*.bin")):
        (directory / shard.name).write_bytes(shard.read_bytes())
    (directory / "fineweb_bpe.model").write_bytes(model)
    return directory


def test_bundled_eval_checks_the_tokenizer_against_the_blob_itself(pipeline, tiny_data_dir, tmp_path):
    sp512 = data_with_tokenizer(tiny_data_dir, tmp_path / "sp512", demo_tokenizer_bytes(512))
    result = isolated_python(pipeline / "packed", "train_gpt.py", "eval", "--data", sp512)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "tokenizer vocabulary is 512 but the model's vocab_size is 1024 (wrong --data or --tokenizer for this "
        "artifact?)")
    other_1024 = demo_tokenizer_bytes(1024, skip_train_docs=100)  # the same vocabulary, other documents
    lookalike = data_with_tokenizer(tiny_data_dir, tmp_path / "other1024", other_1024)
    result = isolated_python(pipeline / "packed", "train_gpt.py", "eval", "--data", lookalike)
    assert result.returncode == 3 and "differs from the tokenizer the model was trained with" in result.stderr
    assert not RESULT_LINE.search(result.stdout)


def test_bundled_eval_refuses_a_crafted_blob_in_one_line(pipeline, tiny_data_dir, tmp_path):
    blob = bytearray((pipeline / "blob" / "model.blob").read_bytes())
    blob[40] ^= 0xFF
    (tmp_path / "bad.blob").write_bytes(bytes(blob))
    (tmp_path / "junk.blob").write_bytes(b"PGLF" + bytes(100))
    for name in ("bad.blob", "junk.blob"):
        result = isolated_python(pipeline / "packed", "train_gpt.py", "eval", "--data", tiny_data_dir,
                                 "--blob", tmp_path / name)
        assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().startswith(f"error: {tmp_path / name}: ")


def test_bundle_follows_the_blob_s_own_lineage_from_any_directory(pipeline, tmp_path, monkeypatch, capsys):
    """Relative --out paths used to be recorded as given: run from another directory holding a decoy `q`,
    bundle baked the decoy's clip setting. Inputs are recorded resolved and found again by digest."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(run_dir)
    assert run_main("quantize", pipeline / "train", "--plan", "int6", "--clip", "percentile", "--out", "q") == 0
    assert run_main("compress", "q", "--codec", "zlib", "--out", "blob") == 0
    monkeypatch.chdir(elsewhere)
    assert run_main("quantize", pipeline / "train", "--plan", "int6", "--clip", "gptq-lite", "--out", "q") == 0
    result = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", run_dir / "blob", "--name", "x",
                     "--github-id", "y", "--out", tmp_path / "bundle")
    assert result.returncode == 0, result.stderr
    baked = read_manifest(tmp_path / "bundle")["config"]["baked"]["quantize"]
    assert baked["clip"] == "percentile"
    inputs = {record["role"]: record["path"] for record in read_manifest(tmp_path / "bundle")["inputs"]}
    assert inputs["quantize"] == str((run_dir / "q" / "manifest.json").resolve())


def test_a_report_of_other_runs_is_not_this_submission_s_score(pipeline, tiny_checkpoint_dir, tiny_data_dir,
                                                                tmp_path, capsys):
    assert run_main("eval", tiny_checkpoint_dir, "--data", tiny_data_dir, "--out", tmp_path / "other-eval") == 0
    assert run_main("report", tmp_path / "other-eval", "--out", tmp_path / "other-report") == 0
    result = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob",
                     "--report", tmp_path / "other-report", "--name", "x", "--github-id", "y",
                     "--out", tmp_path / "b")
    assert result.returncode == 3 and "none of its runs scored this blob" in result.stderr
    assert not (tmp_path / "b").exists()
    # This blob as the report's reference run is not one of its runs either.
    assert run_main("report", tmp_path / "other-eval", "--reference-runs", pipeline / "eval",
                    "--out", tmp_path / "reference-report") == 0
    result = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob",
                     "--report", tmp_path / "reference-report", "--name", "x", "--github-id", "y",
                     "--out", tmp_path / "b")
    assert result.returncode == 3 and "none of its runs scored this blob" in result.stderr


def test_an_unknown_minify_mode_is_a_usage_error(pipeline, tmp_path, capsys):
    result = run_cli(capsys, "bundle", "--train", pipeline / "train", "--blob", pipeline / "blob", "--name", "x",
                     "--github-id", "y", "--compress-code", "--minify", "tight", "--out", tmp_path / "b")
    assert result.returncode == 2 and "--minify: 'tight' is not one of rename, safe, off" in result.stderr
    assert not (tmp_path / "b").exists()


def test_code_bytes_benchmark_reports_each_literal_and_repacks_a_shipped_script_exactly(pipeline):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "code_bytes.py"

    def row(*args) -> dict:
        result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    plain = row(pipeline / "plain" / "train_gpt.py")
    assert plain["packed_rename_latin1_bytes"] < plain["packed_rename_bytes"] < plain["minified_rename_bytes"]
    shipped = row(pipeline / "packed" / "train_gpt.py", "--packed")
    assert shipped["packed_base85_bytes"] == shipped["shipped_bytes"] == plain["packed_rename_bytes"]
    assert shipped["packed_latin1_bytes"] == (pipeline / "packed-latin1" / "train_gpt.py").stat().st_size
