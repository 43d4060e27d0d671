"""The import stage: a challenge record's checkpoint as a pgolf stage output, so quantize, compress and eval run on
it as on a checkpoint pgolf trained.

Input: the record's `final_model.pt` (what its script torch.save()s: a state dict; read with torch.load's
weights_only, never a full unpickle) or a safetensors state dict. Its model is described either by the record's
own env settings, read with that record script's defaults (pgolf/presets/records/<record>.toml) and translated
into a ModelConfig here, or by a pgolf TOML [model] table. Tensor names map onto pgolf's: the 04-16 record's
banked matrices are split per block (its own unbanked export names are pgolf's already), its gates and the 03-22
value embeddings are renamed. A tensor the config's model lacks or needs and does not get, or one of another
shape, is refused naming the first such tensor; a record setting pgolf's model cannot express is refused naming
the setting. Nothing is written then.

The output is an `import` stage directory laid out as a train output (model.safetensors, role `checkpoint`, with
the tokenizer's sha256 in its metadata), which load_stage_model, quantize and eval accept. bundle refuses it: a
bundle bakes a pgolf training run for `train_gpt.py train` to repeat, and an import has none.
"""

import difflib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pgolf.artifacts import StageOutput, sha256_file, up_to_date
from pgolf.checkpoint import check_tensors, expected_shapes, load_checkpoint, save_checkpoint
from pgolf.config import load_preset, read_toml, resolve, to_dict
from pgolf.dist import PlainLog
from pgolf.errors import InvalidInput, UsageError
from pgolf.model import ModelConfig
from pgolf.shards import open_dataset
from pgolf.stage_model import check_tokenizer_match
from pgolf.train_config import MODEL_ALIASES

RECORD_PRESET_KIND = "records"
RECORD_NAMES = ("0416", "0322")  # the records whose settings import translates (their presets hold the defaults)
IMPORT_CONFIG_TABLES = ("model", "train")  # a train config file may be given; only its [model] is read
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BIGRAM_HASH_VOCAB_LIMIT = 59138  # 36313 * token stays in int32 (the 03-22 record hashes in int32; pgolf in int64)
# The 04-16 record's banked matrices: bank -> the pgolf names its rows hold, NUM_LAYERS rows each, in order.
BANKS = {
    "qo_bank": ("blocks.{}.attn.c_q.weight", "blocks.{}.attn.proj.weight"),
    "kv_bank": ("blocks.{}.attn.c_k.weight", "blocks.{}.attn.c_v.weight"),
    "mlp_up_bank": ("blocks.{}.mlp.fc.weight",),
    "mlp_down_bank": ("blocks.{}.mlp.proj.weight",),
}
# Record names of tensors pgolf names otherwise (a pattern and its pgolf name).
RECORD_RENAMES = (
    (re.compile(r"blocks\.(\d+)\.attn\.attn_gate_proj\.weight"), r"blocks.\1.attn.out_gate.weight"),
    (re.compile(r"smear_gate\.weight"), "token_smear.gate.weight"),
    (re.compile(r"smear_lambda"), "token_smear.strength"),
    (re.compile(r"ve_shared\.(embed\.weight|proj\.weight|scale)"), r"value_embed.\1"),
)
VALUE_EMBED_SCALE = re.compile(r"ve_layer_scales\.(\d+)")  # 03-22: one [1] parameter per value-embedding layer
# Record tensors of features pgolf's model does not have, and the setting that made them.
UNSUPPORTED_TENSORS = (
    (re.compile(r"mtp_heads\."), "MTP_NUM_HEADS > 0 (training-only multi-token heads; the record's own "
                                 "final_model.pt leaves them out)"),
    (re.compile(r"(embed_proj|head_proj)\."), "EMBEDDING_DIM != MODEL_DIM (embedding and head projections)"),
    (re.compile(r"blocks\.\d+\.mlp\.mlp_gate_proj\."), "GATE_MLP_OUT=1 (a per-token MLP output gate)"),
    (re.compile(r"blocks\.\d+\.dtg_gate\."), "DTG_ENABLED=1 (a gate on each block's residual update)"),
)


@dataclass(frozen=True)
class ImportConfig:
    record: str = ""  # whose env settings describe the model: 0416 | 0322; "" = a pgolf [model] table (--config)
    settings: tuple[str, ...] = ()  # the record's KEY=VALUE env settings, applied after the env file, in order

    def __post_init__(self):
        if self.record and self.record not in RECORD_NAMES:
            raise ValueError(f"record = {self.record!r}: must be one of {', '.join(RECORD_NAMES)}")
        if self.settings and not self.record:
            raise ValueError("settings: record env settings need a record (--record)")


@dataclass
class ImportResult:
    out: Path
    model_config: ModelConfig  # what the settings described (also in the checkpoint's metadata)
    metrics: dict  # tensors, param_count, dropped, tokenizer_sha256, ... (the manifest's)


# ---------------------------------------------------------------------------------------------------------
# The record's settings -> ModelConfig


def read_env_file(path: Path) -> list[tuple[str, str, str]]:
    """(KEY, VALUE, "file:line") of a file of KEY=VALUE lines (blank lines, `#` comments and a leading `export`
    allowed; one pair of matching quotes around a value is removed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: env file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not an env file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not an env file (not UTF-8 text)") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pairs.append((*split_setting(stripped.removeprefix("export ").lstrip(), f"{path}:{number}"),
                      f"{path}:{number}"))
    return pairs


def split_setting(text: str, source: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not ENV_NAME.fullmatch(key):
        raise UsageError(f"{source}: {text[:80]!r} is not a KEY=VALUE setting")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return key, value[1:-1]
    if any(char.isspace() for char in value):  # `A=1 B=2 torchrun ...`: one setting a line, or quote the value
        raise UsageError(f"{source}: {text[:80]!r}: an unquoted value with spaces (one KEY=VALUE a line)")
    return key, value


def record_preset(record: str) -> tuple[dict, set[str]]:
    """(model settings -> the script's defaults, every other env name the script reads) of a record."""
    preset = load_preset(RECORD_PRESET_KIND, record)
    return dict(preset["model"]), set(preset["other"]["names"])


def parse_record_value(text: str, default, key: str, source: str):
    """`text` read as the record script reads `key` (its type is the default's): int(), float(), bool(int())."""
    try:
        if isinstance(default, bool):
            return bool(int(text))
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "0 or 1" if isinstance(default, bool) else type(default).__name__
        raise UsageError(f"{source}: {key} = {text!r} is not {'an' if kind == 'int' else 'a'} {kind}, as the "
                         f"record's script reads it") from None
    return text


def record_settings(record: str, given: list[tuple[str, str, str]]) -> tuple[dict, list[str]]:
    """(every model setting of the record: its script's default unless given, the env names given that do not
    shape the model). A name the script never reads is refused (a misspelt setting would change nothing)."""
    defaults, other = record_preset(record)
    values, ignored = dict(defaults), []
    for key, text, source in given:
        if key in defaults:
            values[key] = parse_record_value(text, defaults[key], key, source)
        elif key in other:
            ignored.append(key)
        else:
            close = difflib.get_close_matches(key, sorted(defaults.keys() | other), n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"{source}: {key} is not a setting the {record} record's script reads{hint}")
    return values, sorted(set(ignored))


def refuse_unsupported(record: str, values: dict) -> None:
    """UsageError naming the first setting whose model pgolf's GPT cannot reproduce."""
    unsupported = []
    if record == "0416":
        unsupported += [
            (values["GATE_MLP_OUT"], "GATE_MLP_OUT=1: the record's per-token MLP output gate has no pgolf counterpart"),
            (values["EMBEDDING_DIM"] != values["MODEL_DIM"],
             f"EMBEDDING_DIM={values['EMBEDDING_DIM']} differs from MODEL_DIM={values['MODEL_DIM']}: the record's "
             f"embedding and head projections have no pgolf counterpart"),
            # Its RoPE tables are rebuilt only for a longer sequence than any before, so with YaRN a short input's
            # rotation depends on the longest one the model saw: no function of the input alone.
            (values["ROPE_YARN"], "ROPE_YARN=1: the record's rescaled RoPE depends on the longest sequence seen "
                                  "before (a cache), which pgolf's model cannot reproduce"),
        ]
    if record == "0322":
        bigram = values["BIGRAM_VOCAB_SIZE"] > 0
        value_embed = values["VE_ENABLED"] and bool(value_embed_layers(values))
        kv_dim = values["NUM_KV_HEADS"] * (values["MODEL_DIM"] // values["NUM_HEADS"])
        unsupported += [
            (values["DTG_ENABLED"], "DTG_ENABLED=1: the record's gate on each block's residual update has no "
                                    "pgolf counterpart"),
            (bigram and values["BIGRAM_DIM"] == values["MODEL_DIM"],
             "BIGRAM_DIM = MODEL_DIM: the record's BigramHash then has no projection; pgolf's always projects"),
            (bigram and values["VOCAB_SIZE"] > BIGRAM_HASH_VOCAB_LIMIT,
             f"VOCAB_SIZE={values['VOCAB_SIZE']} with BIGRAM_VOCAB_SIZE > 0: the record's bigram hash overflows "
             f"int32 above {BIGRAM_HASH_VOCAB_LIMIT}; pgolf hashes in int64"),
            (value_embed and values["VE_DIM"] == kv_dim,
             f"VE_DIM = the KV width ({kv_dim}): the record's value embedding then has no projection; pgolf's "
             f"always projects"),
        ]
    for refused, message in unsupported:
        if refused:
            raise UsageError(f"record {record}: {message}")


def value_embed_layers(values: dict) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in values["VE_LAYERS"].split(",") if part.strip())
    except ValueError:
        raise UsageError(f"VE_LAYERS = {values['VE_LAYERS']!r} is not a comma-separated list of layers") from None


def record_model_config(record: str, values: dict) -> ModelConfig:
    """The ModelConfig of a record's model: settings that are one field each through MODEL_ALIASES (the names
    `pgolf train` reads too), the others translated here as the record's script interprets them."""
    refuse_unsupported(record, values)
    layers = values["NUM_LAYERS"]
    xsa = values["XSA_LAST_N"]
    overrides = {
        "bos_isolation": False,  # both records smear and hash across document boundaries
        "unet_skips": True,
        "xsa_last_n": min(xsa, layers) if xsa > 0 else 0,  # the scripts clamp, and read <= 0 as off
        "max_seq_len": max(values["TRAIN_SEQ_LEN"], values["EVAL_SEQ_LEN"]),
        "rope_bf16_freqs": True,  # both scripts cast the model to bf16, their RoPE frequency buffer included
    }
    if record == "0416":
        looped = values["NUM_LOOPS"] > 0
        parallel = values["PARALLEL_START_LAYER"]
        lane = values["PARALLEL_FINAL_LANE"].lower()
        overrides |= {
            "activation": "leaky_relu2", "leaky_slope": 0.5,
            "num_loops": max(values["NUM_LOOPS"], 0),
            "loop_start": values["LOOP_START"] if looped else 0,
            "loop_end": values["LOOP_END"] if looped else 0,
            "parallel_start_layer": parallel if 0 < parallel < layers else 0,  # no block >= NUM_LAYERS: off
            "parallel_final_lane": lane if lane in ("attn", "mlp") else "mean",  # the script's fallback
            "smear_gate_width": values["SMEAR_GATE_WIDTH"] if values["SMEAR_GATE"] else 0,
            "attn_out_gate_width": values["GATE_WIDTH"] if values["GATE_ATTN_OUT"] else 0,
            "attn_out_gate_src": "q" if values["GATE_ATTN_SRC"] == "q" else "input",  # "proj": the block input
        }
    else:  # 0322
        overrides |= {
            "activation": "relu2",
            "smear_gate": True,  # its per-channel SmearGate is always on
            "bigram_buckets": max(values["BIGRAM_VOCAB_SIZE"], 0),
            "value_embed_layers": value_embed_layers(values) if values["VE_ENABLED"] else (),
            "rope_ntk_seq_len": 1024,  # its Rotary rescales the base past 1024 tokens, whatever TRAIN_SEQ_LEN is
        }
    env = {key: str(int(value)) if isinstance(value, bool) else str(value) for key, value in values.items()}
    config, _ = resolve(ModelConfig, kind=f"record {record}", env=env, aliases=MODEL_ALIASES, overrides=overrides)
    return config


def record_caveats(record: str, values: dict) -> list[str]:
    """Where the imported model can differ from the record's own run, though it is the same function in float32."""
    if record == "0322" and min(values["TRAIN_SEQ_LEN"], values["EVAL_SEQ_LEN"]) <= 1024:
        return ["the 03-22 script builds RoPE for inputs of <= 1024 tokens in bfloat16 when its model runs in bf16 "
                "(positions and angles rounded, not only the frequencies as in pgolf); at TRAIN_SEQ_LEN or "
                "EVAL_SEQ_LEN <= 1024 the imported model can differ from the record's run at far positions"]
    return []


def file_model_config(config_file: Path) -> ModelConfig:
    """The [model] table of a pgolf TOML (a train config's [train] table is allowed and not read)."""
    layer = read_toml(config_file)
    unknown = sorted(set(layer) - set(IMPORT_CONFIG_TABLES))
    if unknown:
        raise UsageError(f"{config_file}: unknown table(s) {', '.join(unknown)} (valid: [model], [train])")
    if "model" not in layer:
        raise UsageError(f"{config_file}: has no [model] table describing the checkpoint's model")
    config, _ = resolve(ModelConfig, kind="import", config_file=config_file, table="model", env={})
    return config


# ---------------------------------------------------------------------------------------------------------
# The checkpoint's tensors -> pgolf's state dict


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8


def read_record_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(name -> tensor, "safetensors" | "torch") of a checkpoint file. A torch.save file is read with
    weights_only=True: tensors and plain containers only; anything that needs a full unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such checkpoint file")
    if looks_like_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}, "safetensors"
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidInput(f"{path}: not a readable safetensors file ({e})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for unsafe or malformed files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise InvalidInput(f"{path}: cannot be read as plain tensors (torch.load with weights_only: "
                           f"{reason[:200] or type(e).__name__}); pgolf never unpickles arbitrary objects: save "
                           f"the model's state_dict() or a safetensors file") from None
    if not isinstance(loaded, Mapping):
        raise InvalidInput(f"{path}: holds a {type(loaded).__name__}, not a state dict (name -> tensor)")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InvalidInput(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor (a state dict "
                               f"holds only tensors)")
    return dict(loaded), "torch"


def unbank(path: Path, state: dict, config: ModelConfig) -> tuple[dict, dict]:
    """(state with the 04-16 banks split into pgolf's per-block matrices, pgolf name -> where it came from):
    qo_bank [2L, d, d] holds q (i) and the output projection (L + i); kv_bank [2L, kv, d] k (i) and v (L + i)."""
    layers, dim, hidden = config.num_layers, config.model_dim, config.mlp_hidden
    kv_dim = config.num_kv_heads * config.head_dim
    needed = {"qo_bank": (2 * layers, dim, dim), "kv_bank": (2 * layers, kv_dim, dim),
              "mlp_up_bank": (layers, hidden, dim), "mlp_down_bank": (layers, dim, hidden)}
    flat, sources = {}, {}
    for name, tensor in state.items():
        if name not in BANKS:
            if name in flat:
                raise InvalidInput(f"{path}: holds {name} twice (as a bank and by its own name)")
            flat[name], sources[name] = tensor, name
            continue
        if tuple(tensor.shape) != needed[name]:
            raise InvalidInput(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config's model needs "
                               f"{needed[name]} ({layers} layers, model_dim {dim}, KV width {kv_dim}, MLP {hidden})")
        for part, pattern in enumerate(BANKS[name]):
            for block in range(layers):
                target = pattern.format(block)
                if target in flat:
                    raise InvalidInput(f"{path}: holds {target} twice (in {name} and by its own name)")
                flat[target], sources[target] = tensor[part * layers + block], f"{name}[{part * layers + block}]"
    return flat, sources


def rename_record_tensors(path: Path, state: dict, sources: dict) -> tuple[dict, dict]:
    """Record names -> pgolf's (RECORD_RENAMES), and the 03-22 per-layer ve_layer_scales.j gathered into
    value_embed.layer_scales."""
    renamed, origin, layer_scales = {}, {}, {}
    for name, tensor in state.items():
        scale = VALUE_EMBED_SCALE.fullmatch(name)
        if scale:
            layer_scales[int(scale.group(1))] = (name, tensor)
            continue
        target = name
        for pattern, replacement in RECORD_RENAMES:
            if pattern.fullmatch(name):
                target = pattern.sub(replacement, name)
                break
        if target in renamed:
            raise InvalidInput(f"{path}: holds {target} twice (as {origin[target]} and {sources[name]})")
        renamed[target] = tensor
        origin[target] = sources[name] if target == name else f"{sources[name]} (as {target})"
    if layer_scales:
        count = max(layer_scales) + 1
        missing = [f"ve_layer_scales.{j}" for j in range(count) if j not in layer_scales]
        if missing:
            raise InvalidInput(f"{path}: holds ve_layer_scales up to {count - 1} but not {missing[0]}")
        for j in range(count):
            name, tensor = layer_scales[j]
            if tensor.numel() != 1:
                raise InvalidInput(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected (1,)")
        renamed["value_embed.layer_scales"] = torch.cat([layer_scales[j][1].reshape(1) for j in range(count)])
        origin["value_embed.layer_scales"] = f"ve_layer_scales.0..{count - 1} (as value_embed.layer_scales)"
    return renamed, origin


def inert_tensors(record: str, state: dict, shapes: dict) -> dict[str, str]:
    """Tensors the record always saves that its config provably never reads (name -> why): the parallel lanes'
    lambdas when no block runs in parallel (04-16), skip weights with no rows (a model too shallow for skips)."""
    inert = {}
    if record == "0416":
        for name in ("parallel_resid_lambdas", "parallel_post_lambdas"):
            if name in state and name not in shapes:
                inert[name] = "no block runs parallel lanes (PARALLEL_START_LAYER is 0 or >= NUM_LAYERS)"
    for name in ("skip_weights", "skip_gates"):
        if name in state and name not in shapes and state[name].numel() == 0:
            inert[name] = "empty (no U-Net skips at this depth)"
    return inert


def pgolf_state(path: Path, state: dict, config: ModelConfig, record: str) -> tuple[dict, dict]:
    """(pgolf's float32 state dict for `config`, dropped name -> why) of a record's (or pgolf-named) tensors;
    InvalidInput naming the first tensor that has no place in the model, another shape, or is missing."""
    flat, sources = unbank(path, state, config)
    named, origin = rename_record_tensors(path, flat, sources)
    shapes = expected_shapes(config)
    dropped = inert_tensors(record, named, shapes)
    for name, tensor in named.items():
        if name in dropped:
            continue
        if name not in shapes:
            feature = next((why for pattern, why in UNSUPPORTED_TENSORS if pattern.match(name)), None)
            if feature:
                raise InvalidInput(f"{path}: tensor {origin[name]} belongs to a record feature pgolf's model does "
                                   f"not have: {feature}")
            raise InvalidInput(f"{path}: tensor {origin[name]} has no place in the config's model (another "
                               f"record, or settings that differ from the run's?)")
        if tuple(tensor.shape) != shapes[name]:
            raise InvalidInput(f"{path}: tensor {origin[name]} has shape {tuple(tensor.shape)}, the config's model "
                               f"needs {shapes[name]}")
        if not tensor.is_floating_point():
            raise InvalidInput(f"{path}: tensor {origin[name]} is {tensor.dtype}, not floating point")
    missing = [name for name in shapes if name not in named]
    if missing:
        raise InvalidInput(f"{path}: the config's model needs {missing[0]} {shapes[missing[0]]}, which the "
                           f"checkpoint lacks ({len(missing)} tensor(s) missing; settings that differ from the run's?)")
    # float32 (bf16 -> fp32 is exact): what a pgolf train checkpoint holds, whatever the record trained in.
    result = {name: named[name].float().contiguous() for name in shapes}
    check_tensors(path, result, config)  # finite values
    return result, dropped


# ---------------------------------------------------------------------------------------------------------
# The stage


def import_tokenizer(data: Path | None, tokenizer: Path | None) -> tuple[Path, str]:
    """(tokenizer file, its sha256): --tokenizer, or the one of the shard directory --data."""
    if data is None and tokenizer is None:
        raise UsageError("the tokenizer is needed (--data DIR of `pgolf tokenize`, or --tokenizer MODEL): the "
                         "checkpoint records its sha256 as a trained one does")
    if data is None:
        path = Path(tokenizer)
        if not path.is_file():
            raise InvalidInput(f"{path}: tokenizer model not found")
        return path, sha256_file(path)
    dataset = open_dataset(data, tokenizer, verify=())
    if dataset.tokenizer is None:
        raise InvalidInput(f"{data}: no tokenizer (*.model) next to the shards or in ../../tokenizers (pass "
                           f"--tokenizer)")
    return dataset.tokenizer, dataset.tokenizer_sha256()


def resolve_import_model(config: ImportConfig, env_file: Path | None,
                         config_file: Path | None) -> tuple[ModelConfig, dict]:
    """(the checkpoint's ModelConfig, the manifest's record of how it was described)."""
    if bool(config.record) == bool(config_file):
        raise UsageError("describe the checkpoint's model with --record (and --env / --set) or with --config "
                         "FILE.toml, one of the two")
    if env_file is not None and not config.record:
        raise UsageError("--env holds a record's settings: it needs --record")
    if config_file is not None:
        return file_model_config(config_file), {"record": None}
    given = read_env_file(env_file) if env_file is not None else []
    given += [(*split_setting(text, f"--set {text}"), f"--set {text}") for text in config.settings]
    values, ignored = record_settings(config.record, given)
    return record_model_config(config.record, values), {"record": config.record, "settings": values,
                                                        "ignored": ignored}


def import_checkpoint(config: ImportConfig, checkpoint: Path, out: Path, *, env_file: Path | None = None,
                      config_file: Path | None = None, data: Path | None = None, tokenizer: Path | None = None,
                      force: bool = False, log=PlainLog) -> ImportResult:
    """Write `out`: the record checkpoint as model.safetensors (role checkpoint) in pgolf's names, with the
    resolved ModelConfig and the tokenizer's sha256 in its metadata."""
    checkpoint = Path(checkpoint)
    model_config, described = resolve_import_model(config, env_file, config_file)
    tokenizer_path, tokenizer_sha256 = import_tokenizer(data, tokenizer)
    inputs = [checkpoint, tokenizer_path] + [p for p in (data, env_file, config_file) if p is not None]
    configs = {**described, "model": to_dict(model_config)}
    caveats = record_caveats(config.record, described["settings"]) if config.record else []
    for caveat in caveats:
        log.warn(caveat)
    done = up_to_date(out, "import", configs, inputs, force=force, log=log)
    if done:
        return ImportResult(Path(out), model_config, done["metrics"])
    with StageOutput(out, "import", config=configs, force=force, inputs=inputs) as stage:
        check_tokenizer_match(model_config.vocab_size, None, tokenizer_path)
        state, source_format = read_record_state(checkpoint)
        weights, dropped = pgolf_state(checkpoint, state, model_config, config.record)
        stage.add_input(checkpoint, "record_checkpoint")
        stage.add_input(tokenizer_path, "tokenizer")
        for path, role in ((env_file, "record_env"), (config_file, "config")):
            if path is not None:
                stage.add_input(path, role)
        metadata = {"vocab_size": str(model_config.vocab_size), "tokenizer_sha256": tokenizer_sha256,
                    "weights": "imported", "source_sha256": stage.inputs[0]["sha256"],
                    "record": config.record or "none"}
        model_file = stage.add_output("model.safetensors", "checkpoint")
        save_checkpoint(model_file, weights, model_config, metadata)
        reloaded, _, _ = load_checkpoint(model_file)
        stage.check("round_trip", reloaded.keys() == weights.keys()
                    and all(torch.equal(reloaded[name], tensor) for name, tensor in weights.items()),
                    "model.safetensors reads back bit-exactly and matches its config")
        stage.metrics = {
            "record": config.record or None, "source_format": source_format, "tensors": len(weights),
            "param_count": sum(tensor.numel() for tensor in weights.values()), "dropped": dropped,
            "tokenizer_sha256": tokenizer_sha256, "vocab_size": model_config.vocab_size,
            "max_seq_len": model_config.max_seq_len, "caveats": caveats,
        }
        stage.finalize()
    return ImportResult(Path(out), model_config, stage.metrics)

