"""Stage output directories, their manifests, and the lineage between them.

Every stage writes a directory holding its outputs and a `manifest.json` (DESIGN.md, "Data flow between stages").
Outputs are built in a hidden staging directory beside the target; the manifest is written last and the staging
directory is swapped into place, so a crash or Ctrl-C never leaves a directory that looks complete, and never
leaves neither the old output nor the new one.

What `--force` may replace (StageOutput.check_target): only an existing output of the same stage whose directory
holds nothing but what its manifest lists, and never `/`, the current directory or one of its ancestors, an input
of the run, or an ancestor or descendant of an input. A lock file beside the output makes a second concurrent
run on the same `--out` fail at once. Before that, `up_to_date` lets a stage skip a rerun whose finished output
is already there (same config, same input files, outputs intact), and otherwise says what differs.

Provenance: output paths are relative to their stage directory and confined to it; inputs are recorded by their
resolved path, their path relative to the stage directory and their sha256, and are found again by that digest
(`upstream`); the manifest's config and metrics carry their own sha256, so a hand-edited score is refused.
"""

import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from pgolf import __version__
from pgolf.errors import ENVIRONMENT_ERRNOS, InvalidInput, named

SCHEMA = 2
MANIFEST = "manifest.json"
STAGING_MARKER = ".pgolf-staging"  # inside a staging directory: pgolf made it and may remove it
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ARTIFACT_BYTE_LIMIT = 16_000_000  # the challenge's cap on counted code + compressed model (decimal, not MiB)
UPSTREAM_DEPTH = 5  # eval -> compress -> quantize -> train -> tokenize
RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def non_finite_field(obj, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite float in a JSON-like object, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where or "value"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = non_finite_field(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def check_finite_json(obj, where: str) -> None:
    """InvalidInput naming the field: NaN/Inf is no score, and bare `NaN` is not JSON."""
    field = non_finite_field(obj)
    if field:
        raise InvalidInput(f"{where}: {field} is not a finite number; nothing written")


def file_record(path: Path, role: str, name: str | None = None) -> dict:
    """An output (`name`: its path inside the stage directory) or an input (`path` resolved, absolute)."""
    path = Path(path)
    recorded = name if name is not None else str(path.resolve())
    return {"path": recorded, "role": role, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save's bytes with the JSON header's keys sorted. The library writes its metadata map
    in a random order (a Rust HashMap: per process and per call), so the same state saved twice made different
    files, with different digests (which manifests, plans and blobs record) and, through a blob's header,
    brotli sizes that moved by hundreds of bytes."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    ordered = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    if len(ordered) > length:  # the same keys and values in another order: never longer than the original
        raise RuntimeError("safetensors header grew when its keys were sorted")
    return data[:8] + ordered.ljust(length, b" ") + data[8 + length :]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then os.replace into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def copy_file(source: Path, destination: Path) -> None:
    """A copy written atomically (stage outputs are small: logs, results, a blob under 16 MB)."""
    atomic_write_bytes(destination, Path(source).read_bytes())


def atomic_write_json(path: Path, obj) -> None:
    check_finite_json(obj, str(path))
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    """Python/torch/CUDA facts; reads torch only if the stage already imported it, and CUDA only if initialized."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_initialized():
            env["gpu"] = torch.cuda.get_device_name()
    return env


# ---------------------------------------------------------------------------------------------------------
# Reading and checking manifests


def confined_output(directory: Path, name) -> Path:
    """`directory / name` for an output path a manifest lists: relative, no `..`, and (symlinks resolved)
    inside the directory; InvalidInput otherwise."""
    where = Path(directory) / MANIFEST
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidInput(f"{where}: output path {name!r} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise InvalidInput(f"{where}: output path {name!r} leaves the stage directory (absolute or '..')")
    path = Path(directory) / relative
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise InvalidInput(f"{where}: output path {name!r} resolves outside the stage directory (a symlink)")
    return path


def check_file_records(records, where: Path, field: str, absolute: bool) -> None:
    if not isinstance(records, list):
        raise InvalidInput(f"{where}: '{field}' must be a list")
    for index, record in enumerate(records):
        label = f"{where}: {field}[{index}]"
        if not isinstance(record, dict):
            raise InvalidInput(f"{label} is not an object")
        path, role, digest, size = (record.get(k) for k in ("path", "role", "sha256", "bytes"))
        if not isinstance(path, str) or not path or (absolute and not Path(path).is_absolute()):
            raise InvalidInput(f"{label}.path {path!r} is not {'an absolute path' if absolute else 'a path'}")
        if not isinstance(role, str) or not role:
            raise InvalidInput(f"{label}.role {role!r} is not a role name")
        if not isinstance(digest, str) or not SHA256_HEX.match(digest):
            raise InvalidInput(f"{label}.sha256 {digest!r} is not a sha256 hex digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{label}.bytes {size!r} is not a byte count")
        relative = record.get("relative")
        if relative is not None and not isinstance(relative, str):
            raise InvalidInput(f"{label}.relative {relative!r} is not a path")


def validate_manifest(manifest, path: Path) -> dict:
    """Structure, field types and the config/metrics digests; InvalidInput naming the field."""
    if not isinstance(manifest, dict) or "schema" not in manifest:
        raise InvalidInput(f"{path}: not a pgolf manifest")
    if manifest["schema"] != SCHEMA:
        raise InvalidInput(f"{path}: manifest schema {manifest['schema']!r}, this pgolf reads schema {SCHEMA} "
                           f"(made by another pgolf version; re-run that stage)")
    if not isinstance(manifest.get("stage"), str) or not manifest["stage"]:
        raise InvalidInput(f"{path}: 'stage' is not a stage name")
    for field in ("config", "metrics"):
        if not isinstance(manifest.get(field), dict):
            raise InvalidInput(f"{path}: '{field}' must be an object")
        if manifest.get(f"{field}_sha256") != sha256_json(manifest[field]):
            raise InvalidInput(f"{path}: '{field}' does not match {field}_sha256 (edited after the stage ran)")
    if not isinstance(manifest.get("checks", []), list):
        raise InvalidInput(f"{path}: 'checks' must be a list")
    if not isinstance(manifest.get("environment", {}), dict):
        raise InvalidInput(f"{path}: 'environment' must be an object")
    check_file_records(manifest.get("outputs"), path, "outputs", absolute=False)
    check_file_records(manifest.get("inputs"), path, "inputs", absolute=True)
    directory = path.parent
    for out in manifest["outputs"]:
        confined_output(directory, out["path"])
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InvalidInput(f"{directory}: no {MANIFEST} (not a pgolf stage output, or the stage did not finish)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidInput(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read ({e.strerror})") from None
    return validate_manifest(manifest, path)


def verify_outputs(directory: Path, manifest: dict | None = None) -> list[dict]:
    """Re-hash every output listed in the manifest; returns one row per output with `ok` and a `problem`."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    rows = []
    for out in manifest["outputs"]:
        path = confined_output(directory, out["path"])
        row = {"path": str(path), "role": out["role"], "bytes": out["bytes"], "ok": False, "problem": None}
        if not path.is_file():
            row["problem"] = "missing"
        elif path.stat().st_size != out["bytes"]:
            row["problem"] = f"size {path.stat().st_size} != manifest {out['bytes']}"
        elif sha256_file(path) != out["sha256"]:
            row["problem"] = "sha256 does not match the manifest"
        else:
            row["ok"] = True
        rows.append(row)
    return rows


def open_stage(directory: Path, stage: str | tuple[str, ...] | None = None) -> dict:
    """Read a stage directory's manifest and verify its outputs' digests; refuse (exit 3) any mismatch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: no such directory")
    manifest = read_manifest(directory)
    wanted = (stage,) if isinstance(stage, str) else stage
    if wanted and manifest.get("stage") not in wanted:
        raise InvalidInput(
            f"{directory}: is a '{manifest.get('stage')}' output, expected {' or '.join(repr(s) for s in wanted)}"
        )
    for row in verify_outputs(directory, manifest):
        if not row["ok"]:
            raise InvalidInput(f"{row['path']}: {row['problem']}")
    return manifest


def output_path(manifest: dict, directory: Path, role: str) -> Path:
    """The path of the (first) output with this role."""
    for out in manifest["outputs"]:
        if out["role"] == role:
            return confined_output(directory, out["path"])
    raise InvalidInput(f"{directory}: manifest lists no output with role '{role}'")


def output_sha256(manifest: dict, role: str) -> str | None:
    return next((out["sha256"] for out in manifest["outputs"] if out["role"] == role), None)


# ---------------------------------------------------------------------------------------------------------
# Lineage: the stage outputs a manifest's inputs came from, found again by their digests


def input_candidates(record: dict, directory: Path) -> list[Path]:
    """Where an input may be now: its recorded absolute path, then its path relative to the stage directory
    (which still holds when a whole run folder was moved)."""
    candidates = [Path(record["path"])]
    if record.get("relative"):
        candidates.append((Path(directory) / record["relative"]).resolve())
    return list(dict.fromkeys(candidates))


def input_source(record: dict, directory: Path) -> tuple[Path, dict] | None:
    """(stage directory, manifest) of the stage output an input record names: a directory whose manifest lists
    an output of that very sha256 under that file name (or, for a recorded manifest.json, whose manifest file
    has that sha256). None when the input is no stage output (a corpus file, a manifest-less shard directory);
    InvalidInput when that stage output has changed since. Only manifests are read here: a caller that reads
    the upstream's files opens them with open_stage."""
    changed = None
    for candidate in input_candidates(record, directory):
        parent = candidate.parent
        if not (parent / MANIFEST).is_file():
            continue
        manifest = read_manifest(parent)
        if candidate.name == MANIFEST:
            if sha256_file(candidate) == record["sha256"]:
                return parent, manifest
        elif any(out["path"] == candidate.name and out["sha256"] == record["sha256"]
                 for out in manifest["outputs"]):
            return parent, manifest
        changed = changed or candidate
    if changed is not None:
        raise InvalidInput(f"{changed}: changed since {Path(directory) / MANIFEST} recorded it (sha256 "
                           f"{record['sha256'][:12]}...); its lineage no longer holds (re-run the later stages)")
    return None


def lineage(manifest: dict, directory: Path, depth: int = UPSTREAM_DEPTH,
            wanted: tuple[str, ...] = ()) -> dict[str, tuple[Path, dict]]:
    """{stage: (directory, manifest)} of the nearest output of each stage that `manifest` (of `directory`) was
    made from, following input records through each stage's own inputs (breadth first, so the nearest wins;
    it stops once every `wanted` stage is found); every hop is digest-checked (InvalidInput when an upstream
    changed since)."""
    found: dict[str, tuple[Path, dict]] = {}
    frontier, seen = [(Path(directory), manifest)], {Path(directory).resolve()}
    for _ in range(depth):
        if wanted and all(stage in found for stage in wanted):
            break
        following = []
        for current_dir, current in frontier:
            for record in current["inputs"]:
                source = input_source(record, current_dir)
                if source is None or source[0].resolve() in seen:
                    continue
                seen.add(source[0].resolve())
                found.setdefault(source[1]["stage"], source)
                following.append(source)
        frontier = following
    return found


def upstream(manifest: dict, directory: Path, stage: str, depth: int = UPSTREAM_DEPTH) -> tuple[Path, dict] | None:
    """(directory, manifest) of the nearest `stage` output that `manifest` (of `directory`) was made from."""
    return lineage(manifest, directory, depth, wanted=(stage,)).get(stage)


# ---------------------------------------------------------------------------------------------------------
# Writing a stage output


def staging_path(out: Path) -> Path:
    """Where a stage builds `out` before swapping it into place (train keeps it for --resume)."""
    return Path(out).parent / f".{Path(out).name}.partial"


def is_relative(path: Path, other: Path) -> bool:
    return path == other or path.is_relative_to(other)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system cannot."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    result = renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))


class OutputLock:
    """An exclusive fcntl lock on `.<name>.lock` beside an output directory, held for one run.

    Non-blocking: a second run on the same output fails at once. The file is removed on release; an acquirer
    that locked a file its previous holder had just removed notices (the path names another inode) and retries.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InvalidInput(f"{self.path}: cannot write ({e.strerror}); nothing written to {out}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise InvalidInput(f"{out}: another pgolf run (pid {holder}) is writing this output "
                                   f"(lock {self.path}); wait for it or choose another --out") from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
                self.fd = fd
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError as e:
                    self.release()
                    raise InvalidInput(f"{self.path}: cannot write ({e.strerror}); nothing written to {out}") \
                        from None
                return
            os.close(fd)
        raise InvalidInput(f"{out}: could not lock {self.path} (other runs keep replacing it)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def make_parents(out: Path) -> list[Path]:
    """Create the directories above `out` that do not exist yet; returns them, deepest first. A parent that is a
    file, a dangling link or unwritable is InvalidInput naming `out` (nothing is left half-made)."""
    missing = []
    parent = out.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        what = "a dangling symbolic link" if parent.is_symlink() else "not a directory"
        raise InvalidInput(f"{out}: cannot create it: {parent} is {what}")
    made = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            made.insert(0, directory)
    except OSError as e:
        remove_empty(made)
        raise InvalidInput(f"{out}: cannot create it ({e.strerror}: {e.filename})") from None
    return made


def remove_empty(directories: list[Path]) -> None:
    """rmdir each (deepest first) while empty: the parents make_parents created for a run that failed."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def remove_own_directory(path: Path) -> None:
    """rmtree, only of a directory pgolf made: a staging directory (marker inside) or a stage output."""
    if not path.exists():
        return
    if path.is_dir() and not path.is_symlink() and ((path / STAGING_MARKER).is_file() or (path / MANIFEST).is_file()):
        shutil.rmtree(path)
        return
    raise InvalidInput(f"{path}: exists and was not made by pgolf; move it away (pgolf never deletes it)")


def check_placement(out: Path, inputs: list[Path]) -> None:
    """InvalidInput unless `out` is a real directory path apart from every input (not one, inside one, above one)."""
    if out.is_symlink():
        raise InvalidInput(f"{out}: is a symbolic link; give the directory itself as --out")
    real = out.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if source == real or is_relative(source, real) or is_relative(real, source):
            relation = ("an input" if source == real else "inside an input" if is_relative(real, source)
                        else "a directory that holds an input")
            raise InvalidInput(f"{out}: is {relation} of this run ({path}); pgolf never writes there")


# ---------------------------------------------------------------------------------------------------------
# Up to date: a re-run of a finished stage reuses its output instead of refusing or recomputing


def changed_fields(old, new, name: str = "") -> list[str]:
    """`field old -> new` for each config field that differs, nested tables compared field by field."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += changed_fields(old.get(key, "(unset)"), new.get(key, "(unset)"),
                                    f"{name}.{key}" if name else str(key))
        return found
    shown = [json.dumps(value, default=str) for value in (old, new)]
    shown = [text if len(text) <= 40 else text[:37] + "..." for text in shown]
    return [] if old == new else [f"{name or 'config'} {shown[0]} -> {shown[1]}"]


def staleness(out: Path, manifest: dict, config: dict, inputs: list[Path]) -> str | None:
    """What keeps the finished output `out` (its `manifest`, of this stage) from being this run's output, or
    None."""
    config = json.loads(json.dumps(config, default=str))
    if sha256_json(config) != manifest["config_sha256"]:
        fields = changed_fields(manifest["config"], config) or ["the resolved config"]
        more = f"; and {len(fields) - 3} more" if len(fields) > 3 else ""
        return f"config differs: {'; '.join(fields[:3])}{more}"
    given = [Path(path).resolve() for path in inputs]
    recorded = [Path(record["path"]) for record in manifest["inputs"]]
    for path in recorded:  # paths first, digests after: a different input folder is told without hashing
        if not any(is_relative(path, root) for root in given):
            return f"it was made from {path}, which is not under this run's inputs"
    for root in given:
        if not any(is_relative(path, root) for path in recorded):
            return f"input {root} is new (its manifest records nothing from there)"
    for path, record in zip(recorded, manifest["inputs"], strict=True):
        if not path.is_file():
            return f"input {path} is gone"
        if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            return f"input {path} changed since it was made"
    for row in verify_outputs(out, manifest):
        if not row["ok"]:
            return f"output {row['path']}: {row['problem']}"
    return None


def up_to_date(out: Path, stage: str, config: dict, inputs: list[Path], *, force: bool, log) -> dict | None:
    """The manifest of `out` when it already holds this very run's finished output: the same stage and resolved
    config, every recorded input unchanged and under a path this run was given (each of which some record covers),
    every output verifying. Then `log` gets "<out>: up to date (...)" and the stage returns the manifest's result
    without recomputing. None when there is nothing to reuse (no finished output there, or --force: StageOutput
    decides); otherwise InvalidInput saying what differs."""
    out = Path(out)
    if force or out.is_symlink() or not (out / MANIFEST).is_file():
        return None
    check_placement(out, inputs)
    manifest = read_manifest(out)
    if manifest["stage"] != stage:
        raise InvalidInput(f"{out}: is a '{manifest['stage']}' output; --force replaces only an earlier "
                           f"'{stage}' output")
    reason = staleness(out, manifest, config, inputs)
    if reason:
        raise InvalidInput(f"{out}: output directory already exists and is not up to date ({reason}); "
                           f"pass --force to overwrite")
    log.info(f"{out}: up to date ({stage}, made {manifest.get('created', 'at an unrecorded time')})")
    return manifest


class StageOutput:
    """A stage's output directory under construction.

    Files are written into `self.dir` (a hidden staging directory next to `out`); `finalize()` hashes them, writes
    the manifest last and swaps the staging directory into place. Used as a context manager, any exception (Ctrl-C
    included) removes the staging directory unless `keep_partial` (train keeps it so `--resume` can continue), and
    a write that fails for lack of space or permission becomes one line naming the file (exit 3).

    `inputs`: the paths the run reads (directories or files); `out` may never be one of them, inside one, or hold
    one. The constructor checks what `--force` would replace and takes the output's lock before anything is
    written.
    """

    def __init__(
        self,
        out: Path,
        stage: str,
        *,
        argv: list[str] | None = None,
        config: dict | None = None,
        force: bool = False,
        resume: bool = False,
        keep_partial: bool = False,
        inputs: list[Path] = (),
    ):
        self.out = Path(out)
        self.stage = stage
        self.argv = list(sys.argv if argv is None else argv)
        self.config = config or {}
        self.force = force
        self.keep_partial = keep_partial
        self.protected = [Path(p) for p in inputs]
        self.inputs: list[dict] = []
        self.outputs: list[tuple[str, str]] = []
        self.metrics: dict = {}
        self.checks: list[dict] = []
        self.started = time.time()
        self.dir = staging_path(self.out)
        self.aside = self.out.parent / f".{self.out.name}.replaced"
        self.check_target(self.protected)
        made = make_parents(self.out)
        try:
            self.lock = OutputLock(self.out)
        except BaseException:
            remove_empty(made)
            raise
        try:
            self.recover_interrupted_replace()
            self.check_target(self.protected)  # again, now that no other run can change it
            if self.dir.exists() and not resume:
                remove_own_directory(self.dir)
            self.dir.mkdir(exist_ok=True)
            (self.dir / STAGING_MARKER).touch()
        except BaseException:
            self.lock.release()
            raise

    # ---- what --force may replace ----------------------------------------------------------------------
    def check_target(self, inputs: list[Path]) -> None:
        """InvalidInput (exit 3) naming `out` unless it is absent, or replaceable under --force."""
        out = self.out
        check_placement(out, inputs)
        real = out.resolve()
        if not out.exists():
            return
        if not out.is_dir():
            raise InvalidInput(f"{out}: is a file, not a directory (--out names the output directory)")
        cwd = Path.cwd().resolve()
        if real == Path(real.anchor):
            raise InvalidInput(f"{out}: is the filesystem root; pgolf never replaces it")
        if is_relative(cwd, real):
            what = "the current directory" if real == cwd else "an ancestor of the current directory"
            raise InvalidInput(f"{out}: is {what}; pgolf never replaces it (choose a new --out)")
        if not (out / MANIFEST).is_file():
            raise InvalidInput(f"{out}: already exists and is not a pgolf stage output (no {MANIFEST}); "
                               f"pgolf replaces only its own outputs, so choose another --out")
        if not self.force:
            raise InvalidInput(f"{out}: output directory already exists (pass --force to overwrite)")
        manifest = read_manifest(out)
        if manifest["stage"] != self.stage:
            raise InvalidInput(f"{out}: is a '{manifest['stage']}' output; --force replaces only an earlier "
                               f"'{self.stage}' output")
        listed = {MANIFEST} | {o["path"] for o in manifest["outputs"]}
        entries = sorted(out.iterdir())
        unlisted = [entry for entry in entries if entry.name not in listed]
        if unlisted:
            raise InvalidInput(f"{unlisted[0]}: not an output its manifest lists; --force would delete it, so "
                               f"move it away first")
        not_files = [entry for entry in entries if entry.is_symlink() or not entry.is_file()]
        if not_files:
            raise InvalidInput(f"{not_files[0]}: is not the file its manifest lists (a directory or a link now); "
                               f"--force would delete what it holds, so move it away first")

    def recover_interrupted_replace(self) -> None:
        """A replacement cut short between its two renames left the old output at `.<name>.replaced`."""
        if not self.aside.exists():
            return
        if not self.out.exists() and (self.aside / MANIFEST).is_file():
            os.replace(self.aside, self.out)
            print(f"warning: {self.out}: restored the previous output after an interrupted replacement",
                  file=sys.stderr)
        else:
            remove_own_directory(self.aside)

    # ---- building ----------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / name

    def add_input(self, path: Path, role: str) -> None:
        record = file_record(Path(path), role)
        record["relative"] = os.path.relpath(record["path"], self.out.resolve())
        self.inputs.append(record)

    def add_output(self, name: str, role: str) -> Path:
        self.outputs.append((name, role))
        return self.dir / name

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})

    def manifest(self) -> dict:
        check_finite_json(self.metrics, f"{self.out}: metrics")
        config, metrics = (json.loads(json.dumps(part, default=str)) for part in (self.config, self.metrics))
        return {
            "schema": SCHEMA,
            "stage": self.stage,
            "pgolf_version": __version__,
            "git_commit": git_commit(),
            "argv": self.argv,
            "config": config,
            "config_sha256": sha256_json(config),
            "inputs": self.inputs,
            "outputs": [file_record(self.dir / name, role, name) for name, role in self.outputs],
            "environment": environment(),
            "metrics": metrics,
            "metrics_sha256": sha256_json(metrics),
            "checks": self.checks,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self.started, 3),
        }

    def finalize(self) -> dict:
        """Write the manifest and put the output in place; an earlier output is replaced in one atomic swap
        (or, where the system cannot swap, renamed aside first and recovered by the next run after a crash)."""
        self.check_target(self.protected + [Path(record["path"]) for record in self.inputs])
        manifest = self.manifest()
        atomic_write_json(self.dir / MANIFEST, manifest)
        (self.dir / STAGING_MARKER).unlink()
        if not self.out.exists():
            os.replace(self.dir, self.out)
        elif exchange_paths(self.dir, self.out):
            shutil.rmtree(self.dir)  # now the old output
        else:
            os.replace(self.out, self.aside)
            os.replace(self.dir, self.out)
            shutil.rmtree(self.aside)
        self.lock.release()
        return json.loads(json.dumps(manifest, default=str))

    def holds_nothing(self) -> bool:
        """Whether the staging directory has nothing a resumed run could use (the run failed before it began)."""
        return not self.dir.exists() or {entry.name for entry in self.dir.iterdir()} <= {STAGING_MARKER}

    def abort(self) -> None:
        if self.dir.exists() and (self.dir / STAGING_MARKER).is_file():
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.lock.release()
            return False
        if not self.keep_partial or self.holds_nothing():
            self.abort()
        self.lock.release()
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            where = exc.filename or self.dir
            raise InvalidInput(f"{where}: cannot write ({exc.strerror}); nothing written to {self.out}") from None
        return False
