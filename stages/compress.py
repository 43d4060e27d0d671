"""`pgolf compress QDIR`: pack a quantize output into the counted model blob, trying the layouts asked for."""

from pathlib import Path

import torch
import typer

from pgolf import log
from pgolf.artifacts import StageOutput, atomic_write_bytes, open_stage, output_path
from pgolf.codecs import CODECS, SWITCHES, CompressConfig, blob_candidates, tensors_bit_equal, unpack_blob
from pgolf.config import resolve, to_dict
from pgolf.quantized import load_quantized
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report


def load_quantize_output(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, plan, manifest) of a digest-checked quantize output (plan and tensors cross-checked)."""
    manifest = open_stage(directory, "quantize")
    tensors, plan = load_quantized(output_path(manifest, directory, "quantized"))
    return tensors, plan, manifest


def layout_name(row: dict) -> str:
    on_off = {True: "on", False: "off"}
    return f"{row['codec']}-{row['level']} shuffle={on_off[row['shuffle']]} bitpack={on_off[row['bitpack']]}"


def compress(
    quantized_dir: Path = typer.Argument(..., help="A `pgolf quantize` output directory."),
    out: Path = out_option(),
    codec: str = typer.Option(None, "--codec", help=f"{', '.join(CODECS)} or auto (default: auto)."),
    level: int = typer.Option(
        None, "--level", help="Codec level (default: zlib 9, zstd 22, lzma 9, brotli 11)."),
    shuffle: str = typer.Option(None, "--shuffle", help="Byte-shuffle fp16 scales: on, off, auto (default)."),
    bitpack: str = typer.Option(None, "--bitpack", help="Bit-pack int5-7 levels: on, off, auto (default)."),
    config_file: Path = typer.Option(None, "--config", help="TOML file of compress settings."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Compress a quantized state into model.blob; auto settings try each choice and keep the smallest blob.

    Example: pgolf compress artifacts/run1/q --codec auto --out artifacts/run1/blob
    """
    config, _ = resolve(CompressConfig, kind="compress", config_file=config_file,
                        overrides={"codec": codec, "level": level, "shuffle": shuffle, "bitpack": bitpack})
    inputs = [quantized_dir] + ([config_file] if config_file else [])
    with StageOutput(out, "compress", config=to_dict(config), force=force, inputs=inputs) as stage:
        tensors, plan, manifest = load_quantize_output(quantized_dir)
        codecs = CODECS if config.codec == "auto" else (config.codec,)
        log.info(f"compressing {len(tensors)} tensors with {', '.join(codecs)} "
                 f"(shuffle {config.shuffle}, bitpack {config.bitpack})")
        rows = blob_candidates(tensors, plan, codecs, shuffle=SWITCHES[config.shuffle],
                               bitpack=SWITCHES[config.bitpack], level=config.level,
                               progress=lambda row: log.info(f"  {layout_name(row)}: {row['bytes']:,} B "
                                                             f"({row['seconds']:.2f} s)"))
        best = rows[0]
        restored, restored_plan = unpack_blob(best["blob"])
        if not tensors_bit_equal(restored, tensors) or restored_plan != plan:
            raise RuntimeError("blob round trip is not bit-exact (a codecs bug); nothing written")
        raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        for role in ("quantized", "plan"):
            stage.add_input(output_path(manifest, quantized_dir, role), role)
        atomic_write_bytes(stage.add_output("model.blob", "blob"), best["blob"])
        stage.check("roundtrip_bit_exact", True, "unpack_blob(model.blob) == quantized state + plan")
        stage.metrics = {
            "bytes": best["bytes"], "codec": best["codec"], "level": best["level"],
            "shuffle": best["shuffle"], "bitpack": best["bitpack"],
            "tensor_bytes": raw_bytes, "ratio": round(raw_bytes / best["bytes"], 4),
            "tried": [{k: v for k, v in row.items() if k != "blob"} for row in rows],
        }
        stage.finalize()
    lines = [f"{'*' if row is best else ' '} {layout_name(row)}: {row['bytes']:,} B" for row in rows]
    lines.append(f"{out}/model.blob: {best['bytes']:,} B ({best['codec']}, {raw_bytes / best['bytes']:.2f}x)")
    report({"out": str(out), **stage.metrics}, as_json, lines)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
