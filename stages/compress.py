"""`pgolf compress QDIR`: parse, run pgolf.compress.compress, print."""

from pathlib import Path

import typer

from pgolf import log
from pgolf.codecs import CODECS
from pgolf.compress import CompressConfig, layout_name
from pgolf.compress import compress as run_compress
from pgolf.config import resolve
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report

SHOWN_LAYOUTS = 3  # the smallest few; the manifest lists every layout tried


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
    metrics = run_compress(config, quantized_dir, out, config_file=config_file, force=force, log=log).metrics
    tried = metrics["tried"]
    lines = [f"smallest of {len(tried)} layouts tried (all in the manifest's metrics.tried):"]
    lines += [f"{'*' if index == 0 else ' '} {layout_name(row)}: {row['bytes']:,} B"
              for index, row in enumerate(tried[:SHOWN_LAYOUTS])]
    lines.append(f"model.blob: {metrics['bytes']:,} B ({metrics['codec']}, {metrics['ratio']:.2f}x)")
    report({"out": str(out), **metrics}, as_json, lines, out)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
