"""The compress stage: a quantized state packed into the counted model blob (pgolf.codecs), trying the codec,
byte-shuffle and bit-pack layouts asked for and keeping the smallest.

`compress_quantized` is what both `pgolf compress` and the bundled train_gpt.py run; `compress` wraps it as a
stage that reads a quantize output and writes model.blob with a manifest.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.artifacts import StageOutput, atomic_write_bytes, open_stage, output_path, up_to_date
from pgolf.codecs import CODECS, SWITCHES, blob_candidates, blob_plan, check_codec, tensors_bit_equal, unpack_blob
from pgolf.config import to_dict
from pgolf.dist import PlainLog
from pgolf.quantized import load_quantized


@dataclass(frozen=True)
class CompressConfig:
    codec: str = "auto"  # zlib, zstd, lzma, brotli, or auto (try every codec, keep the smallest blob)
    level: int | None = None  # codec level; None = the codec's densest (zlib 9, zstd 22, lzma 9, brotli 11)
    shuffle: str = "auto"  # split multi-byte tensors (fp16 scales) into byte planes: on, off or auto
    bitpack: str = "auto"  # store int5-int7 levels in 5-7 bits instead of int8 containers: on, off or auto

    def __post_init__(self):
        if self.codec not in (*CODECS, "auto"):
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, auto; got '{self.codec}'")
        if self.level is not None:
            if self.codec == "auto":
                raise ValueError("level needs a named codec (levels differ between codecs), not codec=auto")
            check_codec(self.codec, self.level)
        for name in ("shuffle", "bitpack"):
            if getattr(self, name) not in SWITCHES:
                raise ValueError(f"{name} must be one of on, off, auto; got '{getattr(self, name)}'")


def layout_name(row: dict) -> str:
    on_off = {True: "on", False: "off"}
    return f"{row['codec']}-{row['level']} shuffle={on_off[row['shuffle']]} bitpack={on_off[row['bitpack']]}"


def compress_quantized(tensors: dict[str, torch.Tensor], plan: dict, config: CompressConfig,
                       log=PlainLog) -> list[dict]:
    """Every layout `config` asks for, smallest first (pgolf.codecs.blob_candidates: the first row holds the
    blob), after checking that the smallest restores the state and plan bit-exactly."""
    codecs = CODECS if config.codec == "auto" else (config.codec,)
    log.info(f"compressing {len(tensors)} tensors with {', '.join(codecs)} "
             f"(shuffle {config.shuffle}, bitpack {config.bitpack})")
    rows = blob_candidates(tensors, plan, codecs, shuffle=SWITCHES[config.shuffle], bitpack=SWITCHES[config.bitpack],
                           level=config.level,
                           progress=lambda row: log.info(f"  {layout_name(row)}: {row['bytes']:,} B "
                                                         f"({row['seconds']:.2f} s)"))
    restored, restored_plan = unpack_blob(rows[0]["blob"])
    if not tensors_bit_equal(restored, tensors) or restored_plan != blob_plan(plan):
        raise RuntimeError("blob round trip is not bit-exact (a codecs bug); nothing written")
    return rows


@dataclass
class CompressResult:
    out: Path
    metrics: dict  # bytes, codec, level, shuffle, bitpack, ratio, every layout tried (the manifest's)


def compress(config: CompressConfig, quantized_dir: Path, out: Path, *, config_file: Path | None = None,
             force: bool = False, log=PlainLog) -> CompressResult:
    """Pack a quantize output into `out`/model.blob (or report the one already there, up_to_date)."""
    inputs = [quantized_dir] + ([config_file] if config_file else [])
    done = up_to_date(out, "compress", to_dict(config), inputs, force=force, log=log)
    if done:
        return CompressResult(Path(out), done["metrics"])
    with StageOutput(out, "compress", config=to_dict(config), force=force, inputs=inputs) as stage:
        manifest = open_stage(quantized_dir, "quantize")
        tensors, plan = load_quantized(output_path(manifest, quantized_dir, "quantized"))
        rows = compress_quantized(tensors, plan, config, log)
        best = rows[0]
        raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        for role in ("quantized", "plan"):
            stage.add_input(output_path(manifest, quantized_dir, role), role)
        if config_file:
            stage.add_input(config_file, "config")
        atomic_write_bytes(stage.add_output("model.blob", "blob"), best["blob"])
        stage.check("roundtrip_bit_exact", True, "unpack_blob(model.blob) == quantized state + plan")
        stage.metrics = {
            "bytes": best["bytes"], "codec": best["codec"], "level": best["level"],
            "shuffle": best["shuffle"], "bitpack": best["bitpack"],
            "tensor_bytes": raw_bytes, "ratio": round(raw_bytes / best["bytes"], 4),
            "tried": [{k: v for k, v in row.items() if k != "blob"} for row in rows],
        }
        stage.finalize()
    return CompressResult(Path(out), stage.metrics)
