"""A submission's one self-contained train_gpt.py: pgolf's core inlined, with a run's settings baked in.

Two halves:
- the submission's entry point (`submission_main` and the functions it calls): `python train_gpt.py train`
  retrains, quantizes with the run's final plan, compresses with its codec and evaluates the round trip;
  `python train_gpt.py eval --blob final_model.blob` loads a blob and evaluates it;
- the bundler (`bundle_source`), which writes that file: it collects the core modules `submission_main`
  depends on (following `from pgolf.<module> import ...` lines, in dependency order), drops those import
  lines, keeps only the top-level statements reachable by name from the entry point (so this module's own
  bundler half, and every helper the submission never calls, costs no counted bytes), and appends the baked
  settings.
Inlining puts every module in one namespace, which is why core modules' top-level names must be unique
(docs/INTERNALS.md); the bundler refuses duplicates, aliased pgolf imports and imports a submission machine
cannot be assumed to have.
"""

import argparse
import ast
import base64
import dataclasses
import io
import json
import lzma
import os
import sys
import tokenize
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf.artifacts import atomic_write_bytes
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.codecs import pack_blob
from pgolf.dist import init_distributed
from pgolf.errors import InvalidInput, PgolfError
from pgolf.gptq import calibration_batches, calibration_windows, gptq_hessians
from pgolf.model import ModelConfig, build_model
from pgolf.plans import PlanQuantizer
from pgolf.schemes import SCHEMES
from pgolf.scoring import EvalConfig, EvalModel, EvalPlan, ngram_name, score_stream, warm_up
from pgolf.shards import load_split, open_dataset
from pgolf.stage_model import check_tokenizer_match, load_blob_model
from pgolf.train_config import TrainConfig
from pgolf.trainer import StopSignal, Trainer, TrainLog
from pgolf.ttt import TTTConfig

SUBMISSION_BLOB = "final_model.blob"
SUBMISSION_ENTRY = "submission_main"
PGOLF_DIR = Path(__file__).resolve().parent
# Third-party packages a submission machine has (the challenge's requirements); all else must be stdlib.
SUBMISSION_PACKAGES = ("torch", "numpy", "sentencepiece", "safetensors", "zstandard", "brotli")


# ---------------------------------------------------------------------------------------------------------
# The submission's entry point (inlined)


def submission_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_gpt.py", description="Retrain and export this submission, or evaluate its model blob. "
        "With no command it trains (torchrun --standalone --nproc_per_node=8 train_gpt.py).")
    commands = parser.add_subparsers(dest="command")
    for name, text in (("train", "train, quantize, compress, then evaluate the round trip"),
                       ("eval", "evaluate a model blob on the validation split")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data", default=os.environ.get("DATA_PATH"), help="Shard directory "
                             "(fineweb_{train,val}_*.bin; default $DATA_PATH).")
        command.add_argument("--tokenizer", default=os.environ.get("TOKENIZER_PATH"),
                             help="SentencePiece model (default $TOKENIZER_PATH, else next to the shards).")
    commands.choices["train"].add_argument("--out", default=".", help="Where the blob and logs go.")
    commands.choices["train"].add_argument("--iterations", type=int, default=os.environ.get("ITERATIONS"),
                                           help="Override the baked step limit (default $ITERATIONS).")
    commands.choices["train"].add_argument("--wallclock", type=float,
                                           default=os.environ.get("MAX_WALLCLOCK_SECONDS"),
                                           help="Override the baked training-time cap in seconds.")
    commands.choices["eval"].add_argument("--blob", default=SUBMISSION_BLOB, help="The model blob.")
    args = parser.parse_args(argv or ["train"])
    if args.data is None:
        parser.error("--data DIR (or $DATA_PATH) is required")
    return args


def submission_config(cls, values: dict):
    """A config dataclass from JSON-read values (JSON turns tuple fields into lists)."""
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def submission_data(data: str, tokenizer: str | None, vocab_size: int, tokenizer_sha256: str | None = None,
                    verify: tuple[str, ...] = ("train", "val")):
    """(dataset, val tokens, bpb byte tables) of a shard directory, refused unless its tokenizer is the model's:
    the same vocabulary size and, when the model records one, the same sha256."""
    dataset = open_dataset(Path(data), tokenizer, verify=verify)
    if dataset.tokenizer is None:
        raise InvalidInput(f"{data}: no tokenizer next to the shards (pass --tokenizer or $TOKENIZER_PATH)")
    check_tokenizer_match(vocab_size, tokenizer_sha256, dataset.tokenizer)
    if not dataset.val:
        raise InvalidInput(f"{data}: no validation shards (fineweb_val_*.bin)")
    val_tokens = load_split(dataset.val)
    if len(val_tokens) < 2 or int(val_tokens.max()) >= vocab_size:
        raise InvalidInput(f"{data}: the val split needs at least 2 tokens, all < the model's vocab {vocab_size}")
    return dataset, val_tokens, build_byte_tables(load_tokenizer(dataset.tokenizer), vocab_size)


def submission_quantize(settings: dict, state: dict, model_config: ModelConfig, train_paths: list, device,
                        tokenizer_sha256: str | None = None):
    """(tensors, plan) of `state` under the run's final per-tensor schemes and clip method."""
    quantizer = PlanQuantizer(state, clip=settings["clip"], scale_floor=settings["scale_floor"],
                              gptq_damp=settings["gptq_damp"], gptq_block=settings["gptq_block"],
                              device=device)
    if settings["clip"] == "gptq":  # calibration reads train shards only, as `pgolf quantize` does
        seq_len = settings["calib_seq_len"] or model_config.max_seq_len
        windows = calibration_windows(train_paths, settings["calib_tokens"], seq_len)
        batches = calibration_batches(windows, device)
        integer = [name for name, scheme in settings["schemes"].items() if SCHEMES[scheme].integer]
        gptq_hessians(build_model(state, model_config, device), quantizer, settings["schemes"], integer, batches,
                      print)
    tensors, records = quantizer.quantize(settings["schemes"])
    plan = {**settings["plan"], "model_config": dataclasses.asdict(model_config), "tensors": records,
            "tokenizer_sha256": tokenizer_sha256}
    return tensors, json.loads(json.dumps(plan))  # exactly what a blob's plan reads back as


def submission_evaluate(blob_path: Path, val_tokens: np.ndarray, tables, settings: dict, dist_info):
    """Totals (val_loss, val_bpb, ...) of the blob's model on the validation stream, scored as `pgolf eval`
    scores it with the run's eval settings (windows, n-gram cache, TTT)."""
    state, model_config, _ = load_blob_model(blob_path)
    device = dist_info.device
    model = build_model(state, model_config, device)
    config = submission_config(EvalConfig, settings["eval"])
    ttt = submission_config(TTTConfig, settings["ttt"]) if settings["ttt"] else None
    seq_len = config.seq_len or model_config.max_seq_len
    eval_plan = EvalPlan(seq_len, config.stride(seq_len), config.doc_isolated, config.batch_seqs)
    grid = config.ngram_grid()
    eval_model = EvalModel(model, compile=config.compile and device.type == "cuda")
    warm_up(eval_model, model_config.vocab_size, seq_len, config.batch_seqs, device)
    passed = score_stream(eval_model, val_tokens, eval_plan, tables, device, ngram=grid, ttt_config=ttt,
                      rank=dist_info.rank, world_size=dist_info.world_size)
    return passed.totals[ngram_name(grid[0])] if grid else passed.totals["model"]


def submission_result_line(totals) -> str:
    return (f"final_roundtrip_exact val_loss:{totals.val_loss:.8f} val_bpb:{totals.val_bpb:.8f} "
            f"val_tokens:{totals.targets} val_bytes:{totals.bytes}")


def submission_train(baked: dict, args: argparse.Namespace) -> None:
    dist_info = init_distributed(fast_math=True)
    model_config = submission_config(ModelConfig, baked["model"])
    overrides = {"iterations": args.iterations, "wallclock_seconds": args.wallclock, "checkpoint_every": 0}
    train_config = dataclasses.replace(submission_config(TrainConfig, baked["train"]),
                                       **{k: v for k, v in overrides.items() if v is not None})
    dataset, val_tokens, tables = submission_data(args.data, args.tokenizer, model_config.vocab_size,
                                                  baked.get("tokenizer_sha256"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model_config, train_config, dataset.train, dist_info)
    log = TrainLog(out, dist_info.is_main, on_line=print)
    log.line(f"model: {trainer.param_count:,} parameters; world size {dist_info.world_size}; "
             f"{train_config.iterations} steps at most, wallclock cap {train_config.wallclock_seconds}s")
    trainer.warmup()
    with StopSignal() as stop:
        val_tensor = torch.from_numpy(val_tokens.astype(np.int32))
        metrics = trainer.run(val_tensor, tables.torch(trainer.device), log, out / "resume.safetensors", stop)
    blob_path = out / SUBMISSION_BLOB
    if dist_info.is_main:
        use_ema = "ema" in metrics and baked["quantize"]["weights"] == "export"  # as `pgolf quantize --weights`
        state = trainer.ema_state() if use_ema else trainer.master_state()
        tensors, plan = submission_quantize(baked["quantize"], state, model_config, dataset.train,
                                            trainer.device, dataset.tokenizer_sha256())
        blob = pack_blob(tensors, plan, **baked["compress"])
        atomic_write_bytes(blob_path, blob)
        code_bytes = Path(__file__).stat().st_size
        log.line(f"Serialized model {baked['compress']['codec']}: {len(blob)} bytes")
        log.line(f"Code size: {code_bytes} bytes")
        log.line(f"Total submission size: {len(blob) + code_bytes} bytes")
    if dist_info.world_size > 1:
        dist.barrier()
    log.line(submission_result_line(submission_evaluate(blob_path, val_tokens, tables, baked["eval"],
                                                        dist_info)))


def submission_eval(baked: dict, args: argparse.Namespace) -> None:
    """Score a blob: the tokenizer is checked against the blob's own model config and recorded digest, not
    against this bundle's settings (the blob may come from another run)."""
    dist_info = init_distributed()
    _, model_config, plan = load_blob_model(Path(args.blob))
    _, val_tokens, tables = submission_data(args.data, args.tokenizer, model_config.vocab_size,
                                            plan.get("tokenizer_sha256"), verify=("val",))
    totals = submission_evaluate(Path(args.blob), val_tokens, tables, baked["eval"], dist_info)
    if dist_info.is_main:
        print(submission_result_line(totals))


def submission_main(baked: dict, argv: list[str] | None = None) -> None:
    args = submission_arguments(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "eval":
            submission_eval(baked, args)
        else:
            submission_train(baked, args)
        if dist.is_initialized():
            dist.barrier()  # tear the group down together (as `pgolf eval`: a rank leaving early aborts gloo)
    except PgolfError as e:  # one line and the documented exit code, as `pgolf` prints them
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# The bundler (not inlined: nothing above calls it)


@dataclasses.dataclass
class CoreModule:
    name: str  # module name inside pgolf ("__init__" for `from pgolf import x`)
    path: Path
    source: str
    tree: ast.Module
    dependencies: list[str]  # pgolf modules it imports from, in order of appearance


def pgolf_import_target(node: ast.ImportFrom) -> str | None:
    """The pgolf module a `from pgolf... import` statement reads, or None for other imports."""
    if node.module == "pgolf":
        return "__init__"
    if node.module and node.module.startswith("pgolf."):
        return node.module.removeprefix("pgolf.")
    return None


def parse_core_module(name: str, directory: Path = PGOLF_DIR) -> CoreModule:
    path = directory / f"{name}.py"
    if not path.is_file():
        raise InvalidInput(f"{path}: core module not found")
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    top_level = set(map(id, tree.body))
    dependencies = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import) and any(a.name == "pgolf" or a.name.startswith("pgolf.")
                                                for a in node.names):
            raise InvalidInput(f"{where}: `import pgolf...` cannot be inlined; use `from pgolf.x import y`")
        if not isinstance(node, ast.ImportFrom) or (target := pgolf_import_target(node)) is None:
            continue
        if id(node) not in top_level:
            raise InvalidInput(f"{where}: pgolf imports must be at module top level to be inlined")
        if "." in target or any(alias.asname or alias.name == "*" for alias in node.names):
            raise InvalidInput(f"{where}: only `from pgolf.<module> import name, ...` (no `as`, no `*`, "
                               f"no subpackages) can be inlined")
        dependencies.append(target)
    return CoreModule(name, path, source, tree, list(dict.fromkeys(dependencies)))


def modules_in_order(entry: str, directory: Path = PGOLF_DIR) -> list[CoreModule]:
    """`entry` and every core module it imports, each after the modules it imports (depth-first)."""
    ordered: dict[str, CoreModule] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name):], name])
            raise InvalidInput(f"{directory}: circular pgolf imports {cycle} cannot be inlined")
        visiting.append(name)
        module = parse_core_module(name, directory)
        for dependency in module.dependencies:
            visit(dependency)
        visiting.pop()
        ordered[name] = module

    visit(entry)
    return list(ordered.values())


def bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the module namespace (compound statements: none counted)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def referenced_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in referenced_names(node.test)


def import_meanings(node: ast.Import | ast.ImportFrom) -> dict[str, str]:
    """{bound name: what it names}, e.g. `import torch.nn.functional as F` -> {"F": "torch.nn.functional"}."""
    if isinstance(node, ast.ImportFrom):
        return {alias.asname or alias.name: f"{'.' * node.level}{node.module}.{alias.name}"
                for alias in node.names}
    meanings = {}
    for alias in node.names:
        root = alias.name.split(".")[0]
        meanings[alias.asname or root] = alias.name if alias.asname else root
    return meanings


def binding_meanings(module: CoreModule, node: ast.stmt) -> dict[str, str]:
    """What each name a top-level statement binds stands for. Imports of one thing, and assignments of one
    literal (BOS_ID = 1 in two modules) mean the same wherever they appear; other definitions are unique."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return import_meanings(node)
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
        return dict.fromkeys(bound_names(node), f"the constant {ast.unparse(node.value)}")
    return dict.fromkeys(bound_names(node), f"a definition in {module.path.name}")


def check_unique_names(modules: list[CoreModule]) -> None:
    """Refuse a name bound at top level by two modules to different things."""
    owners: dict[str, tuple[CoreModule, str]] = {}
    for module in modules:
        for node in module.tree.body:
            if isinstance(node, ast.ImportFrom) and pgolf_import_target(node) is not None:
                continue
            for name, meaning in binding_meanings(module, node).items():
                other, other_meaning = owners.setdefault(name, (module, meaning))
                if other is not module and meaning != other_meaning:
                    raise InvalidInput(f"{module.path}:{node.lineno}: top-level name '{name}' is also "
                                       f"bound in {other.path}; core modules share one namespace when "
                                       f"bundled (rename one, e.g. with a module prefix)")


def check_submission_imports(module: CoreModule, node: ast.stmt) -> None:
    """Refuse imports (anywhere in a kept statement) of packages a submission machine may lack."""
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            roots = [alias.name.split(".")[0] for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and pgolf_import_target(child) is None:
            roots = [child.module.split(".")[0]]
        else:
            continue
        for root in roots:
            if root not in sys.stdlib_module_names and root not in SUBMISSION_PACKAGES:
                allowed = ", ".join(SUBMISSION_PACKAGES)
                raise InvalidInput(f"{module.path}:{child.lineno}: imports '{root}', which a submission "
                                   f"cannot rely on (allowed: the standard library, {allowed})")


def reachable_statements(modules: list[CoreModule], entry: str) -> set[int]:
    """ids of the top-level statements the entry point needs: a fixpoint over names referenced by kept
    statements. Side-effect statements (bare calls, attribute assignments, if/try blocks) are always kept."""
    statements = [node for module in modules for node in module.tree.body
                  if not (isinstance(node, ast.ImportFrom) and pgolf_import_target(node) is not None)
                  and not is_main_guard(node)
                  and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    needed, kept = {entry}, set()
    changed = True
    while changed:
        changed = False
        for node in statements:
            if id(node) in kept:
                continue
            names = bound_names(node)
            if not names or names & needed:
                kept.add(id(node))
                needed |= referenced_names(node)
                changed = True
    return kept


def statement_lines(module: CoreModule, node: ast.stmt) -> list[str]:
    """The statement's source lines, with its decorators and the comment lines right above it."""
    lines = module.source.splitlines()
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return lines[first : node.end_lineno]


def bundle_source(baked: dict, title: str, entry: str = SUBMISSION_ENTRY, entry_module: str = "bundle",
                  directory: Path = PGOLF_DIR) -> str:
    """Text of a self-contained train_gpt.py: the pruned core, then the baked settings and a main guard."""
    modules = modules_in_order(entry_module, directory)
    check_unique_names(modules)
    kept = reachable_statements(modules, entry)
    parts = [f'"""{title}\n\nGenerated by `pgolf bundle`: pgolf\'s core modules inlined, with this run\'s '
             f'settings baked into BAKED below.\nUsage: python train_gpt.py [train|eval] --help\n"""']
    emitted_imports: set[str] = set()
    for module in modules:
        body = []
        for node in module.tree.body:
            if id(node) not in kept:
                continue
            check_submission_imports(module, node)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(node)
                if text in emitted_imports:
                    continue
                emitted_imports.add(text)
            body.append("\n".join(statement_lines(module, node)))
        if body:
            parts.append(f"# {'-' * 100}\n# pgolf/{module.path.name}\n\n" + "\n\n".join(body))
    parts.append(f"BAKED = {baked!r}\n\nif __name__ == \"__main__\":\n    {entry}(BAKED)")
    source = "\n\n\n".join(parts) + "\n"
    compile(source, "train_gpt.py", "exec")  # a syntax error here is a bundler bug, not the user's
    return source


def minified_source(source: str) -> str:
    """`source` without docstrings, comments and blank lines; every other line stays as written, so the result
    parses on every Python the source does (ast.unparse on 3.12 prints f-strings 3.11 rejects). Nothing in the
    core reads a __doc__. Lines inside multi-line strings are content and are kept byte for byte."""
    tree = ast.parse(source)
    lines = source.splitlines()
    encoded = [line.encode() for line in lines]  # ast columns count UTF-8 bytes
    keep, drop, replace, cut = set(), set(), {}, {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            keep.update(range(node.lineno, node.end_lineno))  # the lines after a string's first
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = node.body[0] if node.body else None
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        first, last = doc.lineno - 1, doc.end_lineno - 1
        tail = encoded[last][doc.end_col_offset:].strip()
        if encoded[first][: doc.col_offset].strip() or (tail and not tail.startswith(b"#")):
            continue  # shares its lines with code
        drop.update(range(first, last + 1))
        if len(node.body) == 1:  # a body of only the docstring keeps a `pass` in its place
            drop.discard(first)
            replace[first] = " " * doc.col_offset + "pass"
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            cut[token.start[0] - 1] = token.start[1]
    kept = []
    for index, line in enumerate(lines):
        if index in drop:
            continue
        if index in keep:
            kept.append(line)
            continue
        line = replace.get(index, line[: cut.get(index, len(line))].rstrip())
        if line.strip():
            kept.append(line)
    minified = "\n".join(kept) + "\n"
    compile(minified, "train_gpt.py", "exec")
    return minified


def self_extracting(source: str) -> str:
    """The smallest of lzma/zlib-compressed, base85-encoded copies of `source` behind a two-line exec stub
    (pass it minified_source(...) to count fewer bytes)."""
    candidates = []
    for codec, packed in (("lzma", lzma.compress(source.encode(), preset=9 | lzma.PRESET_EXTREME)),
                          ("zlib", zlib.compress(source.encode(), 9))):
        encoded = base64.b85encode(packed).decode()
        stub = f"import base64,{codec}\nexec({codec}.decompress(base64.b85decode(\"{encoded}\")))\n"
        candidates.append(stub)
    return min(candidates, key=len)


def extracted_source(script: str) -> str:
    """The source a self_extracting() stub runs (for checking it is the bundled one, byte for byte)."""
    header, call = script.splitlines()
    codec = header.split(",")[1]
    encoded = call.split('"')[1]
    return {"lzma": lzma, "zlib": zlib}[codec].decompress(base64.b85decode(encoded)).decode()
