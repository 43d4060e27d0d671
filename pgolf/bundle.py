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

import ast
import base64
import contextlib
import dataclasses
import json
import lzma
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import brotli

from pgolf.artifacts import (
    ARTIFACT_BYTE_LIMIT,
    MANIFEST,
    StageOutput,
    atomic_write_bytes,
    atomic_write_json,
    copy_file,
    lineage,
    open_stage,
    output_path,
    output_sha256,
    up_to_date,
)
from pgolf.codecs import read_blob, read_blob_header
from pgolf.config import from_dict
from pgolf.dist import PlainLog
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.evaluate import EvalConfig
from pgolf.plans import plan_from_mapping
from pgolf.report import reported_weights, run_scores
from pgolf.submission import SUBMISSION_BLOB, SUBMISSION_CONFIGS

SUBMISSION_ENTRY = "submission_main"
SUBMISSION_MODULE = "submission"
PGOLF_DIR = Path(__file__).resolve().parent
# Third-party packages a submission machine has (the challenge's requirements); all else must be stdlib.
SUBMISSION_PACKAGES = ("torch", "numpy", "sentencepiece", "safetensors", "zstandard", "brotli")


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


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
          ast.GeneratorExp)


def scope_parts(scope: ast.AST) -> tuple[list[ast.AST], list[ast.AST]]:
    """(nodes evaluated where the scope is defined, nodes inside the scope): a def's decorators, defaults and
    annotations run in the enclosing scope, its body in its own; a comprehension's first iterable runs outside."""
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        every_arg = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
        outside = [*getattr(scope, "decorator_list", []), *args.defaults, *filter(None, args.kw_defaults),
                   *filter(None, (a.annotation for a in every_arg)), *filter(None, [getattr(scope, "returns", None)])]
        inside = [scope.body] if isinstance(scope, ast.Lambda) else list(scope.body)
        return outside, inside
    if isinstance(scope, ast.ClassDef):
        return [*scope.decorator_list, *scope.bases, *scope.keywords], list(scope.body)
    first, *rest = scope.generators
    parts = [first.target, *first.ifs, *(part for g in rest for part in (g.target, g.iter, *g.ifs))]
    elements = [scope.key, scope.value] if isinstance(scope, ast.DictComp) else [scope.elt]
    return [first.iter], parts + elements


def direct_nodes(roots: list[ast.AST]):
    """Every node under `roots` outside nested scopes, and the nested scopes themselves."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, SCOPES):
            stack.extend(scope_parts(node)[0])
            continue
        stack.extend(ast.iter_child_nodes(node))


def free_names(scope: ast.AST) -> set[str]:
    """Names a function, class or comprehension reads from enclosing scopes (in the bundle: module globals), by
    Python's rule that a name bound anywhere in a function body is local to it. Class bodies do not enclose
    their methods."""
    _, inside = scope_parts(scope)
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        bound = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs,
                                 *filter(None, (args.vararg, args.kwarg)))}
    else:
        bound = set()
    loads, declared_global = set(), set()
    for node in direct_nodes(inside):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Global):
            declared_global |= set(node.names)
        if isinstance(node, SCOPES) and node is not scope:
            loads |= free_names(node)
    if isinstance(scope, ast.ClassDef):
        return loads  # class-level names are looked up in the class, then globally: keep every read
    return (loads - bound) | (loads & declared_global)


def statement_references(node: ast.stmt) -> set[str]:
    """Global names a top-level statement reads when it runs or when what it defines is called."""
    if isinstance(node, SCOPES):
        outside, _ = scope_parts(node)
        return free_names(node) | {name for part in outside for name in referenced_names(part)}
    return referenced_names(node)


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


def reachable_statements(modules: list[CoreModule], entry: str, stubs: Mapping[str, str] = MappingProxyType({})
                         ) -> set[int]:
    """ids of the top-level statements the entry point needs: a fixpoint over names referenced by kept
    statements. Side-effect statements (bare calls, attribute assignments, if/try blocks) are always kept; a
    stubbed definition references nothing."""
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
                if not names & set(stubs):
                    needed |= statement_references(node)
                changed = True
    return kept


def left_out(baked: dict) -> dict[str, str]:
    """The core's functions and classes a submission with these settings never calls (its script takes no
    setting but paths and the train budget): name -> why. bundle_source writes each as a stub that raises, so
    the code only they reach (model features the config turns off, GPTQ, LQER, the TTT module, the n-gram
    sweep, the size fits the plan doesn't use) is left out of the counted bytes too."""
    spec = plan_from_mapping(baked["plan"], "BAKED['plan']")
    fit, evaluation = spec.fit_mode, baked["eval"]
    clip = (baked.get("quantize") or {}).get("clip") or spec.clip
    out = {}
    if clip not in ("gptq", "gptq-sdclip") and not (baked.get("train") or {}).get("gptq_calibration_batches"):
        out |= dict.fromkeys(("gptq_levels", "gptq_hessians", "collect_hessians"), "it runs no GPTQ")
    if (baked.get("quantize") or {}).get("calibration") != "generated":
        out["generated_windows"] = "it calibrates on no generated tokens"
    if not spec.lqer_top_k:
        out |= dict.fromkeys(("lqer_factors", "lqer_quantize_factor", "lqer_restore_factor"), "its plan has no LQER")
    model, train = baked.get("model") or {}, baked.get("train") or {}
    for name, used, why in (("BigramHash", model.get("bigram_buckets"), "its model has no BigramHash"),
                            ("SmearGate", model.get("smear_gate"), "its model has no SmearGate"),
                            ("TokenSmearGate", model.get("smear_gate_width"), "its model has no token SmearGate"),
                            ("ValueEmbedding", model.get("value_embed_layers"), "its model has no value embeddings"),
                            ("remove_self_value", model.get("xsa_last_n"), "its model has no XSA"),
                            ("document_mask", train.get("isolate_documents"), "it trains without document masks")):
        if not used:
            out[name] = why
    if baked["ttt"] is None:
        out["ttt_pass"] = "its eval runs no TTT"
    if not evaluation.get("ngram_order") and not evaluation.get("tilt_order"):
        out["NgramSweep"] = "its eval runs no n-gram cache or tilt"
    if fit != "demote":
        out |= dict.fromkeys(("demotion_order", "fit_plan_to_target"), "its plan demotes no block")
    if fit not in ("clip-k", "clip-k+prune"):
        out |= dict.fromkeys(("fit_clip_k", "gptq_sdclip_levels"), "its plan fits no clip k")
    if fit not in ("prune", "clip-k+prune"):
        out |= dict.fromkeys(("prune_candidates", "fit_prune", "pruned_state"), "its plan prunes nothing")
    return out


def stub_source(node: ast.stmt, why: str) -> str:
    name = node.name
    return (f"def {name}(*args, **kwargs):  # left out of this bundle: {why}\n"
            f"    raise RuntimeError({f'{name}: left out of this bundle ({why})'!r})")


def statement_lines(module: CoreModule, node: ast.stmt) -> list[str]:
    """The statement's source lines, with its decorators and the comment lines right above it."""
    lines = module.source.splitlines()
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return lines[first : node.end_lineno]


def bundle_source(baked: dict, title: str, entry: str = SUBMISSION_ENTRY, entry_module: str = SUBMISSION_MODULE,
                  directory: Path = PGOLF_DIR, stubs: Mapping[str, str] = MappingProxyType({})) -> str:
    """Text of a self-contained train_gpt.py: the pruned core, then the baked settings and a main guard.
    `stubs` (name -> why; left_out) are top-level functions or classes written as stubs that raise."""
    modules = modules_in_order(entry_module, directory)
    check_unique_names(modules)
    definitions = {node.name for module in modules for node in module.tree.body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    unknown = sorted(set(stubs) - definitions)
    if unknown:
        raise ValueError(f"bundle stubs {', '.join(unknown)}: no such top-level function or class in the core")
    kept = reachable_statements(modules, entry, stubs)
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
            stubbed = isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in stubs
            body.append(stub_source(node, stubs[node.name]) if stubbed else "\n".join(statement_lines(module, node)))
        if body:
            parts.append(f"# {'-' * 100}\n# pgolf/{module.path.name}\n\n" + "\n\n".join(body))
    parts.append(f"BAKED = {baked!r}\n\nif __name__ == \"__main__\":\n    {entry}(BAKED)")
    source = "\n\n\n".join(parts) + "\n"
    compile(source, "train_gpt.py", "exec")  # a syntax error here is a bundler bug, not the user's
    return source


# python-minifier settings per --minify mode. Both drop docstrings (nothing in the core reads a __doc__) and the
# annotations of arguments, returns and local variables, but keep class-level annotations: they are dataclass
# fields, which typing.get_type_hints reads and the baked config dicts name (attributes are never renamed).
# Neither renames module globals (class and function names reach error messages and logs through __name__ and
# reprs) nor hoists string literals into module globals (lzma packs the repeated literals better: hoisting cost
# 585 B packed on the demo). `rename` also shortens function locals; parameters keep their names, so keyword
# calls still work.
MINIFY_OPTIONS = {
    "rename": {"rename_locals": True},
    "safe": {"rename_locals": False},
}
MINIFY_MODES = (*MINIFY_OPTIONS, "off")
MINIFY_COMMON = {"remove_literal_statements": True, "hoist_literals": False, "rename_globals": False,
                 "remove_asserts": False, "remove_debug": False}


@contextlib.contextmanager
def pre_pep701_fstrings():
    """python-minifier prints f-strings for the interpreter it runs on; on 3.12+ that may nest a string in the
    outer f-string's own quotes (PEP 701), which 3.11 cannot parse. Make it print 3.11-style f-strings, which
    every supported Python reads (python-minifier is pinned to an exact version for this hook)."""
    import python_minifier.expression_printer
    import python_minifier.f_string

    printer = python_minifier.expression_printer.ExpressionPrinter
    original = printer.visit_JoinedStr

    def visit_joined_str(self, node):
        self.printer.fstring(str(python_minifier.f_string.OuterFString(node, pep701=False)))

    printer.visit_JoinedStr = visit_joined_str
    try:
        yield
    finally:
        printer.visit_JoinedStr = original


def minified_source(source: str, mode: str = "rename") -> str:
    """`source` through python-minifier in one of MINIFY_MODES ("off": unchanged). python-minifier checks that
    its output parses back to the same program (less the names it renamed) and raises otherwise."""
    if mode == "off":
        return source
    if mode not in MINIFY_OPTIONS:
        raise UsageError(f"--minify: '{mode}' is not one of {', '.join(MINIFY_MODES)}")
    import python_minifier  # only bundling minifies: every other command runs without it

    with pre_pep701_fstrings():
        minified = python_minifier.minify(source, filename="train_gpt.py", **MINIFY_COMMON, **MINIFY_OPTIONS[mode])
    minified = minified.rstrip("\n") + "\n"
    compile(minified, "train_gpt.py", "exec")
    return minified


# The self-extracting stub: the payload is assigned on a line of its own that cannot raise, and the program is
# compiled under STUB_FILENAME, with its text registered in linecache, so a traceback from inside it shows the
# program's own lines and never prints the payload line.
STUB_FILENAME = "<train_gpt.py>"


# How the self-extracting script can pack its program. brotli (its built-in text dictionary: 3.3 % smaller than
# lzma on the minified core) only where the submission needs brotli anyway, to read a brotli blob.
CODE_PACKERS = {
    "lzma": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "zlib": lambda data: zlib.compress(data, 9),
    "brotli": lambda data: brotli.compress(data, quality=11, lgwin=24),
}
CODE_UNPACKERS = {"lzma": lzma.decompress, "zlib": zlib.decompress, "brotli": brotli.decompress}


# How the compressed program sits in the script: base85 (ASCII, +25 % over the compressed bytes) or latin1 (the
# bytes themselves as the characters of a string literal in a file declared latin-1: only NUL, CR, LF, the quote
# and the backslash are escaped, ~+2 %; ~9 KB fewer counted bytes on a 50 KB script, but the file is no longer
# text a diff or an editor can show, and re-saving it as UTF-8 breaks it).
CODE_LITERALS = ("base85", "latin1")
LATIN1_ESCAPES = {0: b"\\000", 10: b"\\n", 13: b"\\r", 39: b"\\'", 92: b"\\\\"}


def latin1_literal(data: bytes) -> bytes:
    """A single-quoted string literal, in a file declared latin-1, whose characters' code points are `data`'s
    bytes (NUL as a full three-digit octal escape: a digit after a short one would join it)."""
    return b"'" + b"".join(LATIN1_ESCAPES.get(byte, bytes((byte,))) for byte in data) + b"'"


def self_extracting(source: str, codecs: tuple[str, ...] = ("lzma", "zlib"), literal: str = "base85") -> bytes:
    """The script bytes: the smallest of the `codecs`-compressed (CODE_PACKERS) copies of `source`, as a
    `literal` (CODE_LITERALS) behind an exec stub whose payload line no traceback shows (pass it
    minified_source(...) to count fewer bytes)."""
    if literal not in CODE_LITERALS:
        raise UsageError(f"--code-literal: '{literal}' is not one of {', '.join(CODE_LITERALS)}")
    run = (f"n=\"{STUB_FILENAME}\";linecache.cache[n]=(len(s),None,s.splitlines(True),n);"
           f"exec(compile(s,n,\"exec\"))\n")
    candidates = []
    for codec in codecs:
        packed = CODE_PACKERS[codec](source.encode())
        if literal == "base85":
            candidates.append((f"import base64,linecache,{codec}\np=\"{base64.b85encode(packed).decode()}\"\n"
                               f"s={codec}.decompress(base64.b85decode(p)).decode();" + run).encode())
        else:
            candidates.append(f"#coding:l1\nimport linecache,{codec}\np=".encode() + latin1_literal(packed) + b"\n" +
                              f"s={codec}.decompress(p.encode(\"l1\")).decode();{run}".encode())
    return min(candidates, key=len)


def extracted_source(script: bytes) -> str:
    """The source a self_extracting() script runs (for checking it is the bundled one, byte for byte)."""
    lines = script.split(b"\n")
    if lines[0] == b"#coding:l1":
        codec = lines[1].decode().split(",")[-1]
        packed = ast.literal_eval(lines[2].decode("latin-1")[2:]).encode("latin-1")
    else:
        codec = lines[0].decode().split(",")[-1]
        packed = base64.b85decode(lines[1].decode().split('"')[1])
    return CODE_UNPACKERS[codec](packed).decode()


# ---------------------------------------------------------------------------------------------------------
# The bundle stage: a records-style submission folder from a train run and its blob

TRACK = "10min_16mb"
SUBMISSION_FIELDS = ("val_loss", "val_bpb", "val_loss_std", "val_bpb_std", "p_value", "n_seeds", "seeds",
                     "seed_results")


def bundle_lineage(train_dir: Path, blob_dir: Path) -> tuple[dict, dict, dict, Path]:
    """(train, quantize, compress manifests, quantize dir), checking by digest that the blob was made from this
    train run's checkpoint."""
    train = open_stage(train_dir, ("train", "import"))
    if train["stage"] == "import":
        raise InvalidInput(f"{train_dir}: is an imported record checkpoint (pgolf import); a bundle bakes a pgolf "
                           f"training run for `train_gpt.py train` to repeat, and an import has none: submit it "
                           f"with the record's own script")
    compress = open_stage(blob_dir, "compress")
    found = lineage(compress, blob_dir, depth=1).get("quantize")
    if found is None:
        raise InvalidInput(f"{blob_dir}: its manifest names no quantize output that still exists")
    quantize_dir = found[0]
    quantize = open_stage(quantize_dir, "quantize")
    checkpoint = next((i for i in quantize["inputs"] if i["role"] == "checkpoint"), None)
    train_weights = {out["sha256"] for out in train["outputs"] if out["role"] in ("checkpoint", "checkpoint_master")}
    if checkpoint is None or checkpoint["sha256"] not in train_weights:
        raise InvalidInput(f"{blob_dir}: was not made from {train_dir}'s checkpoint (via {quantize_dir})")
    return train, quantize, compress, quantize_dir


def open_eval(eval_dir: Path | None, compress: dict) -> dict | None:
    """The eval manifest, checked to be an evaluation of this very blob."""
    if eval_dir is None:
        return None
    evaluation = open_stage(eval_dir, "eval")
    evaluated = lineage(evaluation, eval_dir, depth=1).get("compress")
    if evaluated is None or output_sha256(evaluated[1], "blob") != output_sha256(compress, "blob"):
        raise InvalidInput(f"{eval_dir}: is not an evaluation of this blob")
    return evaluation


def manifest_field(manifest: dict, stage: str, *keys: str):
    """manifest[keys[0]][keys[1]]...; InvalidInput naming the stage and the field when it is missing."""
    value = manifest
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise InvalidInput(f"the {stage} output's manifest has no '{'.'.join(keys)}' (made by another pgolf "
                               f"version, or edited)")
        value = value[key]
    return value


def baked_settings(train: dict, quantize: dict, compress: dict, plan: dict, evaluation: dict | None) -> dict:
    """BAKED: every config the run's stages recorded in their manifests (each config's to_dict, as it ran) plus
    the resolved plan, so `python train_gpt.py train` runs what pgolf ran. Eval settings: the given eval's, else
    `pgolf eval`'s defaults. Each is parsed back here, so a manifest pgolf cannot read fails now, not on the
    submission machine."""
    baked = {
        "tokenizer_sha256": manifest_field(train, "train", "metrics").get("tokenizer_sha256"),
        "model": manifest_field(train, "train", "config", "model"),
        "train": manifest_field(train, "train", "config", "train"),
        "quantize": manifest_field(quantize, "quantize", "config"), "plan": manifest_field(plan, "quantize", "plan"),
        "compress": manifest_field(compress, "compress", "config"),
        "eval": manifest_field(evaluation, "eval", "config", "eval") if evaluation is not None
        else dataclasses.asdict(EvalConfig()),
        "ttt": manifest_field(evaluation, "eval", "config").get("ttt") if evaluation is not None else None,
    }
    try:
        configs = {key: from_dict(cls, baked[key], f"manifest config '{key}'") if baked[key] is not None else None
                   for key, cls in SUBMISSION_CONFIGS.items()}
    except UsageError as e:  # a manifest this pgolf cannot read is bad input, not a bad flag
        raise InvalidInput(str(e)) from None
    if len(configs["eval"].ngram_grid()) > 1:
        raise UsageError("--eval: that run swept an n-gram grid; bundle the eval of a single setting")
    return baked


def scores(train_dir: Path, train: dict, blob_sha256: str, eval_dir: Path | None, evaluation: dict | None,
           report_dir: Path | None, log) -> dict:
    """Score fields, each read from a file its manifest's digests cover (pgolf.report.run_scores): a multi-seed
    report's (refused unless one of its runs scored this blob or this run's checkpoint), else this blob's eval,
    else none; the train run's pre-quant score kept apart."""
    try:
        pre_quant = run_scores(train_dir, train)
    except InvalidInput as e:
        log.warn(f"no pre-quantization score in submission.json: {e}")
        pre_quant = {"val_loss": None, "val_bpb": None}
    fields = {"pre_quant_val_loss": pre_quant["val_loss"], "pre_quant_val_bpb": pre_quant["val_bpb"]}
    if evaluation is not None:
        fields |= run_scores(eval_dir, evaluation)
    if report_dir is not None:
        report = open_stage(report_dir, "report")
        ours = {blob_sha256, *(out["sha256"] for out in train["outputs"] if out["role"].startswith("checkpoint"))}
        if not reported_weights(report_dir, report) & ours:
            raise InvalidInput(f"{report_dir}: none of its runs scored this blob or {train_dir}'s weights; a "
                               f"report's score belongs to its own runs")
        submission = output_path(report, report_dir, "submission")
        fields |= {key: value for key, value in json.loads(submission.read_text()).items()
                   if key in SUBMISSION_FIELDS}
    return fields


def readme_text(submission: dict, baked: dict, command: str) -> str:
    score = (f"val_bpb **{submission['val_bpb']:.8f}** (val_loss {submission['val_loss']:.8f})"
             if submission.get("val_bpb") is not None else "not evaluated after quantization yet")
    model, train = baked["model"], baked["train"]
    lines = [
        f"# {submission['name']}", "",
        submission.get("blurb") or "Built with pgolf (train -> quantize -> compress -> bundle).", "",
        "## Results", "",
        f"- Score: {score}",
        "- Pre-quantization: " + (f"val_bpb {submission['pre_quant_val_bpb']:.4f}"
                                    if submission["pre_quant_val_bpb"] is not None else "not recorded"),
        f"- Artifact: {submission['bytes_total']:,} bytes = model {submission['bytes_model']:,} "
        f"({baked['compress']['codec']}) + code {submission['bytes_code']:,}",
    ]
    if submission.get("seed_results"):
        lines += ["", "| Seed | val_loss | val_bpb |", "|------|----------|---------|"]
        lines += [f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} |"
                  for seed, r in submission["seed_results"].items()]
        if submission.get("p_value") is not None:
            lines.append(f"\nOne-sided t-test p-value: {submission['p_value']:.3g}")
    lines += [
        "", "## Configuration", "",
        f"- Model: {model['num_layers']} layers x {model['model_dim']}, {model['num_heads']} heads / "
        f"{model['num_kv_heads']} KV, MLP {model['mlp_mult']}x, vocab {model['vocab_size']}",
        f"- Training: {train['batch_tokens']:,} tokens/step, seq {train['seq_len']}, at most "
        f"{train['iterations']} steps / {train['wallclock_seconds']} s, seed {train['seed']}",
        f"- Quantization: plan {baked['plan']['name']}, clip {baked['plan']['clip']}",
        "", "```bash", command, "```", "",
        "## Included files", "",
        "- `train_gpt.py`: the counted code (`python train_gpt.py train|eval --help`)",
        f"- `{SUBMISSION_BLOB}`: the counted model blob", "- `submission.json`",
        "- `train.log`, `train_log.jsonl` (and `eval_results.json` when the blob was evaluated)",
    ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class BundleResult:
    out: Path
    metrics: dict  # bytes_total, bytes_code, bytes_model, val_loss, val_bpb (the manifest's)


def bundle(train_dir: Path, blob_dir: Path, out: Path, *, name: str, github_id: str, author: str | None = None,
           blurb: str = "", eval_dir: Path | None = None, report_dir: Path | None = None,
           compress_code: bool = False, minify: str | None = None, code_literal: str = "base85",
           force: bool = False, log=PlainLog) -> BundleResult:
    """Write a records-style folder: train_gpt.py (the counted code), final_model.blob, README.md,
    submission.json and the train logs. `minify` (MINIFY_MODES; default "rename" with compress_code, else "off")
    is applied to the shipped program; `code_literal` (CODE_LITERALS) is how compress_code embeds it. OverBudget
    (exit 4) when model + code exceed the cap. A finished `out` made from the same inputs and settings is
    reported, not made again (up_to_date)."""
    if minify is None:
        minify = "rename" if compress_code else "off"
    if minify not in MINIFY_MODES:
        raise UsageError(f"--minify: '{minify}' is not one of {', '.join(MINIFY_MODES)}")
    if code_literal not in CODE_LITERALS:
        raise UsageError(f"--code-literal: '{code_literal}' is not one of {', '.join(CODE_LITERALS)}")
    if code_literal != "base85" and not compress_code:
        raise UsageError(f"--code-literal {code_literal} applies to --compress-code only")
    train, quantize, compress, quantize_dir = bundle_lineage(train_dir, blob_dir)
    blob_path = output_path(compress, blob_dir, "blob")
    _, plan = read_blob(blob_path)
    evaluation = open_eval(eval_dir, compress)
    baked = baked_settings(train, quantize, compress, plan, evaluation)
    config = {"baked": baked, "compress_code": compress_code, "minify": minify}
    if code_literal != "base85":  # absent by default: bundles made before the option stay up to date
        config["code_literal"] = code_literal
    inputs = [train_dir, quantize_dir, blob_dir] + [p for p in (eval_dir, report_dir) if p is not None]
    done = up_to_date(out, "bundle", config, inputs, force=force, log=log)
    if done:
        return BundleResult(Path(out), done["metrics"])
    with StageOutput(out, "bundle", config=config, force=force, inputs=inputs) as stage:
        source = bundle_source(baked, f"{name}: Parameter Golf submission by {author or github_id}",
                               stubs=left_out(baked))
        source = minified_source(source, minify)  # the shipped program: its names and docstrings are counted bytes
        packers = ("lzma", "zlib", "brotli") if read_blob_header(blob_path.read_bytes())["codec"] == "brotli" \
            else ("lzma", "zlib")
        code = self_extracting(source, packers, code_literal) if compress_code else source.encode()
        if compress_code and extracted_source(code) != source:
            raise RuntimeError("self-extracting script does not reproduce the bundled source (a bundler bug)")
        bytes_model, bytes_code = blob_path.stat().st_size, len(code)
        if bytes_model + bytes_code > ARTIFACT_BYTE_LIMIT:
            raise OverBudget(f"{blob_dir}: model {bytes_model:,} + code {bytes_code:,} bytes exceed the "
                             f"{ARTIFACT_BYTE_LIMIT:,}-byte cap by "
                             f"{bytes_model + bytes_code - ARTIFACT_BYTE_LIMIT:,}")
        submission = {
            "name": name, "author": author or github_id, "github_id": github_id, "blurb": blurb,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "track": TRACK,
            "val_loss": None, "val_bpb": None,
            **scores(train_dir, train, output_sha256(compress, "blob"), eval_dir, evaluation, report_dir,
                     log),
            "bytes_total": bytes_model + bytes_code, "bytes_code": bytes_code, "bytes_model": bytes_model,
            "hardware": train.get("environment", {}).get("gpu"),
            "pytorch_version": train.get("environment", {}).get("torch"),
        }
        if submission["val_bpb"] is None:
            log.warn("no --eval or --report: submission.json has no post-quantization score yet")
        command = "torchrun --standalone --nproc_per_node=8 train_gpt.py train --data DATA_DIR"
        for directory, role in ((train_dir, "train"), (quantize_dir, "quantize"), (blob_dir, "compress"),
                                (eval_dir, "eval"), (report_dir, "report")):
            if directory is not None:
                stage.add_input(directory / MANIFEST, role)
        atomic_write_bytes(stage.add_output("train_gpt.py", "code"), code)
        copy_file(blob_path, stage.add_output(SUBMISSION_BLOB, "blob"))
        atomic_write_json(stage.add_output("submission.json", "submission"), submission)
        readme = readme_text(submission, baked, command)
        atomic_write_bytes(stage.add_output("README.md", "readme"), readme.encode())
        for role, file_name in (("log", "train.log"), ("log_jsonl", "train_log.jsonl")):
            copy_file(output_path(train, train_dir, role), stage.add_output(file_name, role))
        if evaluation is not None:
            copy_file(output_path(evaluation, eval_dir, "results"), stage.add_output("eval_results.json",
                                                                                     "eval_results"))
        stage.metrics = {key: submission[key] for key in ("bytes_total", "bytes_code", "bytes_model",
                                                          "val_loss", "val_bpb")}
        stage.check("fits_cap", True, f"{bytes_model + bytes_code:,} <= {ARTIFACT_BYTE_LIMIT:,} bytes")
        stage.finalize()
    return BundleResult(Path(out), stage.metrics)
