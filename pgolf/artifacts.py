"""Stage output directories and their manifests.

Every stage writes a directory holding its outputs and a `manifest.json` (DESIGN.md, "Data flow between stages").
Outputs are built in a hidden staging directory beside the target; the manifest is written last and the staging
directory is renamed into place, so a crash or Ctrl-C never leaves a directory that looks complete.
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pgolf import __version__
from pgolf.errors import InvalidInput

SCHEMA = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_record(path: Path, role: str, name: str | None = None) -> dict:
    path = Path(path)
    return {"path": name or str(path), "role": role, "sha256": sha256_file(path), "bytes": path.stat().st_size}


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
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj) -> None:
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


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InvalidInput(f"{directory}: no {MANIFEST} (not a pgolf stage output, or the stage did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "outputs" not in manifest:
        raise InvalidInput(f"{path}: not a pgolf manifest of schema {SCHEMA}")
    return manifest


def verify_outputs(directory: Path, manifest: dict | None = None) -> list[dict]:
    """Re-hash every output listed in the manifest; returns one row per output with `ok` and a `problem`."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    rows = []
    for out in manifest["outputs"]:
        path = directory / out["path"]
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
            return Path(directory) / out["path"]
    raise InvalidInput(f"{directory}: manifest lists no output with role '{role}'")


class StageOutput:
    """A stage's output directory under construction.

    Files are written into `self.dir` (a hidden staging directory next to `out`); `finalize()` hashes them, writes the
    manifest last and renames the staging directory to `out`. Used as a context manager, any exception (Ctrl-C
    included) removes the staging directory unless `keep_partial` (train keeps it so `--resume` can continue).
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
    ):
        self.out = Path(out)
        self.stage = stage
        self.argv = list(sys.argv if argv is None else argv)
        self.config = config or {}
        self.keep_partial = keep_partial
        self.inputs: list[dict] = []
        self.outputs: list[tuple[str, str]] = []
        self.metrics: dict = {}
        self.checks: list[dict] = []
        self.started = time.time()
        if self.out.exists() and not force:
            raise InvalidInput(f"{self.out}: output directory already exists (pass --force to overwrite)")
        self.dir = self.out.parent / f".{self.out.name}.partial"
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def add_input(self, path: Path, role: str) -> None:
        self.inputs.append(file_record(Path(path), role))

    def add_output(self, name: str, role: str) -> Path:
        self.outputs.append((name, role))
        return self.dir / name

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})

    def manifest(self) -> dict:
        return {
            "schema": SCHEMA,
            "stage": self.stage,
            "pgolf_version": __version__,
            "git_commit": git_commit(),
            "argv": self.argv,
            "config": self.config,
            "config_sha256": sha256_json(self.config),
            "inputs": self.inputs,
            "outputs": [file_record(self.dir / name, role, name) for name, role in self.outputs],
            "environment": environment(),
            "metrics": self.metrics,
            "checks": self.checks,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self.started, 3),
        }

    def finalize(self) -> dict:
        manifest = self.manifest()
        atomic_write_json(self.dir / MANIFEST, manifest)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.dir, self.out)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.keep_partial:
            self.abort()
        return False
