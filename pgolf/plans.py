"""Quantization plans: which scheme each tensor of a checkpoint gets, and demoting whole blocks (pgolf.fit
searches how many blocks a byte target needs).

A plan is a named preset (pgolf/presets/plans/<name>.toml) or a TOML/JSON plan file with the same keys:
    default = "int6"            scheme of every large >= 2-D float tensor no pattern matches
    embedding = "int8"          same, for tok_emb / lm_head / bigram.embed (unset: `default`)
    clip = "gptq-lite"          percentile | gptq-lite | gptq (the command line's --clip overrides it)
    scale_floor = "none"        none | challenge (scales >= 1/qmax, as the baseline's export)
    demote = "center-out"       optional: center-out | sensitivity, demoting blocks until --target-bytes fits
    demote_to = "int5"          the scheme demoted blocks get
    fit = "clip-k+prune"        optional: demote (needs `demote`) | clip-k | prune | clip-k+prune: how an artifact
                                over --target-bytes is made to fit (clip-k: every sdclip k times one factor in
                                [clip_k_min, clip_k_max], the smallest that fits; prune: zero the fewest
                                smallest-|scale| +-1 levels that make it fit; clip-k+prune: clip-k, then prune
                                what is left)
    clip_k_min = 1.0            the smallest k factor clip-k tries (< 1: narrow the clip to fill the budget)
    clip_k_max = 1.5            the largest k factor clip-k tries
    embedding_k = 15.0          sdclip's k for tok_emb (unset: pgolf.clips.SDCLIP_SIGMAS)
    gates = "int8"              float (the export's rule) | int8: gate tensors (GATE_PATTERNS) get int8-gate
    lqer_top_k = 0              LQER on the K integer tensors with the largest quantization error ||W - deq||
    lqer_rank = 4               rank of LQER's residual SVD
    lqer_bits = 4               2 | 4: bits of LQER's asymmetric per-row factor levels
    [tensors]                   fnmatch pattern -> scheme (int5..int8, int8-gate, intB+lqerF, fp16, fp32); first
    "blocks.*.mlp.*" = "int5"   match wins; a pattern that matches no tensor is an error
Tensors no pattern matches follow the challenge's export: non-float tensors unchanged; tensors of at most
65,536 elements (or under 2-D) kept in float, fp32 for control tensors (gains, scales, mixes, gates, skip
weights) and fp16 for the rest; larger ones get `embedding` or `default`.
"""

import dataclasses
import fnmatch
import json
from pathlib import Path

import torch

from pgolf.clips import CLIP_METHODS, gptq_sdclip_levels
from pgolf.config import PRESETS, coerce, field_types, preset_names, read_toml
from pgolf.errors import UsageError
from pgolf.gptq import GPTQ_BLOCK, GPTQ_DAMP
from pgolf.model import BlockLayout
from pgolf.quant import SCALE_FLOORS
from pgolf.quantized import QUANTIZED_FORMAT_VERSION, quantize_entry
from pgolf.schemes import (
    GATE_SCHEME,
    INTEGER_SCHEMES,
    LQER_BITS,
    PLAN_SCHEMES,
    RAW_SCHEME,
    SCHEMES,
    IntScheme,
    is_quantizable,
    lqer_scheme,
)

PLAN_KIND = "plans"
DEMOTE_MODES = ("center-out", "sensitivity")
FIT_MODES = ("demote", "clip-k", "prune", "clip-k+prune")
GATE_MODES = ("float", "int8")
# Substrings of the gate tensors `gates = "int8"` quantizes (attention output / head gates, SmearGates, skip gates).
GATE_PATTERNS = ("attn.out_gate.", "attn.head_gate.", "smear.gate", "token_smear.gate", "skip_gates")
KEEP_FLOAT_MAX_NUMEL = 65_536  # the challenge's INT8_KEEP_FLOAT_MAX_NUMEL
# Substrings of control-tensor names (the challenge's list plus pgolf.model's gates and mixes): kept fp32.
QUANT_CONTROL_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weight",
    "smear.gate",
    "head_gate",
    "out_gate",
    "v_mix",
    "bigram.scale",
    "skip_gates",
    "parallel_",
    "token_smear.",
    "value_embed.scale",
    "value_embed.layer_scales",
)
EMBEDDING_PREFIXES = ("tok_emb.", "lm_head.", "bigram.embed.")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    name: str  # preset name or plan file path
    default: str = "int8"  # scheme of large >= 2-D float tensors that no pattern matches
    embedding: str | None = (
        None  # scheme of tok_emb / lm_head / bigram.embed that no pattern matches (None: default)
    )
    tensors: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern, scheme) rules, first match wins
    clip: str = "percentile"  # clip method unless the command line picks one
    scale_floor: str = "none"  # none | challenge (scales >= 1/qmax, the baseline export's floor)
    demote: str | None = None  # center-out | sensitivity: demote blocks until the target size fits
    demote_to: str = "int5"  # scheme a demoted block's integer tensors get
    fit: str | None = None  # demote | clip-k | prune | clip-k+prune (None: demote when `demote` is set)
    clip_k_min: float = 1.0  # the smallest factor the clip-k fit tries (< 1 narrows the clip to fill the budget)
    clip_k_max: float = 1.5  # the largest factor the clip-k fit multiplies every sdclip k by
    embedding_k: float | None = None  # sdclip k of tok_emb (None: pgolf.clips.SDCLIP_SIGMAS)
    gates: str = "float"  # float | int8: gate tensors (GATE_PATTERNS) kept float or per-row int8 (int8-gate)
    lqer_top_k: int = 0  # LQER on this many integer tensors, largest quantization error first
    lqer_rank: int = 4  # rank of the LQER residual SVD
    lqer_bits: int = 4  # 2 | 4: LQER factor level bits
    description: str = ""  # one line for listings

    def __post_init__(self):
        for field in ("default", "demote_to"):
            if getattr(self, field) not in PLAN_SCHEMES:
                raise ValueError(
                    f"{field} = {getattr(self, field)!r}: must be one of {', '.join(PLAN_SCHEMES)}"
                )
        if self.embedding is not None and self.embedding not in PLAN_SCHEMES:
            raise ValueError(f"embedding = {self.embedding!r}: must be one of {', '.join(PLAN_SCHEMES)}")
        for pattern, scheme in self.tensors:
            if scheme not in PLAN_SCHEMES:
                raise ValueError(
                    f"tensors.{pattern!r} = {scheme!r}: must be one of {', '.join(PLAN_SCHEMES)}"
                )
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip = {self.clip!r}: must be one of {', '.join(CLIP_METHODS)}")
        if self.scale_floor not in SCALE_FLOORS:
            raise ValueError(f"scale_floor = {self.scale_floor!r}: must be one of {', '.join(SCALE_FLOORS)}")
        if self.demote is not None and self.demote not in DEMOTE_MODES:
            raise ValueError(f"demote = {self.demote!r}: must be one of {', '.join(DEMOTE_MODES)}")
        if self.fit is not None and self.fit not in FIT_MODES:
            raise ValueError(f"fit = {self.fit!r}: must be one of {', '.join(FIT_MODES)}")
        if self.fit == "demote" and self.demote is None:
            raise ValueError("fit = 'demote' needs demote = center-out | sensitivity")
        if self.fit not in (None, "demote") and self.demote is not None:
            raise ValueError(f"fit = {self.fit!r} and demote = {self.demote!r}: pick one way to fit")
        if not 1.0 <= self.clip_k_max <= 100.0:
            raise ValueError(f"clip_k_max = {self.clip_k_max!r}: must be in [1, 100]")
        if not 0.05 <= self.clip_k_min <= 1.0:
            raise ValueError(f"clip_k_min = {self.clip_k_min!r}: must be in [0.05, 1]")
        if self.embedding_k is not None and not 0.0 < self.embedding_k <= 1000.0:
            raise ValueError(f"embedding_k = {self.embedding_k!r}: must be in (0, 1000]")
        if self.gates not in GATE_MODES:
            raise ValueError(f"gates = {self.gates!r}: must be one of {', '.join(GATE_MODES)}")
        if self.lqer_top_k < 0 or self.lqer_rank < 1:
            raise ValueError(f"lqer_top_k = {self.lqer_top_k}, lqer_rank = {self.lqer_rank}: need >= 0 and >= 1")
        if self.lqer_bits not in LQER_BITS:
            raise ValueError(f"lqer_bits = {self.lqer_bits!r}: must be one of {', '.join(map(str, LQER_BITS))}")
        if self.demote is not None and self.demote_to not in INTEGER_SCHEMES:
            raise ValueError(f"demote_to = {self.demote_to!r}: must be one of {', '.join(INTEGER_SCHEMES)}")

    @property
    def fit_mode(self) -> str | None:
        """How an over-target artifact is fitted: `fit`, else demote when `demote` is set, else None."""
        return self.fit or ("demote" if self.demote else None)

    def to_dict(self) -> dict:
        spec = dataclasses.asdict(self)
        spec["tensors"] = [list(rule) for rule in self.tensors]
        return spec


def plan_names() -> list[str]:
    return preset_names(PLAN_KIND)


def read_plan_file(path: Path) -> dict:
    if path.suffix == ".json":
        try:
            return json.loads(path.read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not a readable JSON plan ({e})") from None
    return read_toml(path)


def load_plan(plan: str) -> PlanSpec:
    """A preset by name, or a .toml/.json plan file; otherwise UsageError (exit 2) naming the presets."""
    path = Path(plan)
    if plan in plan_names():
        raw, source = read_toml(PRESETS / PLAN_KIND / f"{plan}.toml"), plan
    elif path.suffix in (".toml", ".json") and path.is_file():
        raw, source = read_plan_file(path), str(path)
    elif path.suffix in (".toml", ".json"):
        raise UsageError(f"{path}: plan file not found")
    else:
        raise UsageError(
            f"unknown plan '{plan}' (valid: {', '.join(plan_names())}; or a .toml/.json plan file)"
        )
    return plan_from_mapping(raw, source)


def plan_from_mapping(raw, source: str) -> PlanSpec:
    """A PlanSpec from a plan file's table, or from PlanSpec.to_dict() (a plan.json's "plan", a bundle's);
    UsageError naming `source` for anything else."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: a plan must be a table of settings")
    raw = dict(raw)
    name = raw.pop("name", source)
    fields = {f.name for f in dataclasses.fields(PlanSpec)} - {"name"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UsageError(
            f"{source}: unknown plan setting '{unknown[0]}' (valid: {', '.join(sorted(fields))})"
        )
    rules = raw.get("tensors", {})
    if isinstance(rules, list) and all(isinstance(rule, list) and len(rule) == 2 for rule in rules):
        rules = dict(rules)  # PlanSpec.to_dict's [pattern, scheme] pairs
    if not isinstance(rules, dict) or not all(isinstance(v, str) for v in rules.values()):
        raise UsageError(f"{source}: 'tensors' must map name patterns to scheme names")
    types = field_types(PlanSpec)
    values = {key: coerce(value, types[key], key, source) for key, value in raw.items() if key != "tensors"}
    try:
        return PlanSpec(name=str(name), **values, tensors=tuple(rules.items()))
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in QUANT_CONTROL_PATTERNS)


def is_embedding_tensor(name: str) -> bool:
    return name.startswith(EMBEDDING_PREFIXES)


def is_gate_tensor(name: str) -> bool:
    return any(pattern in name for pattern in GATE_PATTERNS)


def export_default_scheme(name: str, tensor: torch.Tensor, spec: PlanSpec, keep_float_numel: int) -> str:
    """The challenge export's rule for a tensor no plan pattern names (a gate tensor under `gates = "int8"`:
    int8-gate)."""
    if not tensor.is_floating_point():
        return RAW_SCHEME
    if spec.gates == "int8" and is_gate_tensor(name) and SCHEMES[GATE_SCHEME].applies(tensor, keep_float_numel):
        return GATE_SCHEME
    if not is_quantizable(tensor, keep_float_numel):
        return "fp32" if is_control_tensor(name) else "fp16"
    if is_embedding_tensor(name):
        return spec.embedding or spec.default
    return spec.default


def rule_applies(scheme: str, tensor: torch.Tensor, keep_float_numel: int) -> bool:
    """Integer rules reach only quantizable tensors, float rules any float tensor; so "blocks.0.*" = "int8"
    leaves block 0's gains and mixes in float."""
    return SCHEMES[scheme].applies(tensor, keep_float_numel)


def assign_schemes(spec: PlanSpec, state_dict: dict, keep_float_numel: int = KEEP_FLOAT_MAX_NUMEL) -> dict:
    """{tensor name: scheme}: the first pattern that matches and applies, else the export's default rule.
    UsageError for a pattern that matches no tensor, or none it can apply to."""
    examples = ", ".join(list(state_dict)[:4])
    for pattern, scheme in spec.tensors:
        matched = fnmatch.filter(state_dict, pattern)
        if not matched:
            raise UsageError(
                f"{spec.name}: pattern '{pattern}' matches no tensor of the checkpoint "
                f"(names look like {examples})"
            )
        if not any(rule_applies(scheme, state_dict[name], keep_float_numel) for name in matched):
            raise UsageError(
                f"{spec.name}: pattern '{pattern}' = {scheme} matches only tensors that must stay float "
                f"(non-float, under 2-D, or at most {keep_float_numel:,} elements), e.g. '{matched[0]}'"
            )
    schemes = {}
    for name, tensor in state_dict.items():
        schemes[name] = next(
            (
                scheme
                for pattern, scheme in spec.tensors
                if fnmatch.fnmatchcase(name, pattern) and rule_applies(scheme, tensor, keep_float_numel)
            ),
            None,
        ) or export_default_scheme(name, tensor, spec, keep_float_numel)
    return schemes


def demotable_blocks(schemes: dict, layout: BlockLayout) -> dict[int, list[str]]:
    """{block index: its integer-quantized tensor names}: the units demotion works on."""
    blocks: dict[int, list[str]] = {}
    for name, scheme in schemes.items():
        index = layout.block_of(name)
        if index is not None and SCHEMES[scheme].integer:
            blocks.setdefault(index, []).append(name)
    return dict(sorted(blocks.items()))


def demote_blocks(schemes: dict, blocks: list[int], scheme: str, layout: BlockLayout) -> dict:
    """A copy of `schemes` with the integer tensors of `blocks` at `scheme` (never promoted; an intB+lqerF tensor
    goes to the LQER variant of `scheme`, its factors refitted to the new residual)."""
    out = dict(schemes)
    for name, current in schemes.items():
        if (
            layout.block_of(name) in blocks
            and SCHEMES[current].integer
            and SCHEMES[current].level_bits > SCHEMES[scheme].level_bits
        ):
            factor_bits = getattr(SCHEMES[current], "factor_bits", None)  # an LQER tensor keeps its correction
            out[name] = lqer_scheme(scheme, factor_bits) if factor_bits else scheme
    return out


class PlanQuantizer:
    """Quantizes the tensors of one state dict under changing scheme assignments, caching every
    (tensor, scheme) result so that demotion steps only quantize what they change."""

    def __init__(
        self,
        state_dict: dict,
        *,
        clip: str,
        scale_floor: str,
        gptq_damp: float = GPTQ_DAMP,
        gptq_block: int = GPTQ_BLOCK,
        device: str | torch.device = "cpu",
        lqer_rank: int = 4,
        embedding_k: float | None = None,
    ):
        self.state_dict = state_dict
        self.options = {
            "clip": clip,
            "scale_floor": scale_floor,
            "gptq_damp": gptq_damp,
            "gptq_block": gptq_block,
            "lqer_rank": lqer_rank,
            "embedding_k": embedding_k,
        }
        self.k_scale = 1.0  # sdclip k factor by default (the clip-k fit sets the one it found; the cache is per factor)
        self.device = torch.device(device)
        self.hessians: dict[str, torch.Tensor] = {}
        self.cache: dict[tuple[str, str], tuple[dict, dict]] = {}

    def entry(self, name: str, scheme: str, k_scale: float | None = None) -> tuple[dict, dict]:
        """(stored, record) of one tensor; `k_scale`: the sdclip k factor (None: self.k_scale)."""
        k_scale = (self.k_scale if k_scale is None else k_scale) if SCHEMES[scheme].integer else 1.0
        key = (name, scheme, k_scale)
        if key not in self.cache:
            tensor = self.state_dict[name].to(self.device)
            self.cache[key] = quantize_entry(
                name, tensor, scheme, hessian=self.hessians.get(name), k_scale=k_scale, **self.options
            )
        return self.cache[key]

    def prefetch(self, schemes: dict, k_scales: list[float]) -> None:
        """Quantize every plain int tensor under gptq-sdclip at all of `k_scales` at once (one stacked GPTQ solve
        per tensor, gptq_sdclip_levels) into the cache: the clip-k fit sizes a round of factors on threads, and
        each thread's own GPTQ is a Python loop per column that the threads run one at a time (the GIL)."""
        if self.options["clip"] != "gptq-sdclip":
            return
        options = {key: self.options[key] for key in ("gptq_damp", "gptq_block", "embedding_k")}
        for name, scheme in schemes.items():
            missing = [k for k in dict.fromkeys(k_scales) if (name, scheme, k) not in self.cache]
            if type(SCHEMES[scheme]) is not IntScheme or name not in self.hessians or len(missing) < 2:
                continue
            tensor, hessian = self.state_dict[name].to(self.device), self.hessians[name]
            solved = gptq_sdclip_levels(tensor, SCHEMES[scheme].level_bits, missing, self.options["scale_floor"],
                                        name=name, hessian=hessian, **options)
            for k, levels in zip(missing, solved, strict=True):
                self.cache[(name, scheme, k)] = quantize_entry(name, tensor, scheme, hessian=hessian, k_scale=k,
                                                               gptq_levels=levels, **self.options)

    def quantization_error(self, name: str, scheme: str) -> float:
        """||W - deq(Q(W))||_F of one tensor under `scheme`."""
        restored = self.restored(name, scheme)
        return (self.state_dict[name].detach().float().cpu() - restored.cpu()).norm().item()

    def quantize(self, schemes: dict, k_scale: float | None = None) -> tuple[dict, dict]:
        """(stored tensors, per-tensor plan records); `k_scale` as in entry (threads may pass their own)."""
        tensors, records = {}, {}
        for name, scheme in schemes.items():
            stored, records[name] = self.entry(name, scheme, k_scale)
            tensors.update(stored)
        return tensors, records

    def restored(self, name: str, scheme: str) -> torch.Tensor:
        stored, _ = self.entry(name, scheme)
        return SCHEMES[scheme].restore(name, stored)

    def dequantized(self, schemes: dict) -> dict:
        """The float state dict the quantized tensors restore to."""
        return {name: self.restored(name, scheme) for name, scheme in schemes.items()}


def lqer_assign(spec: PlanSpec, schemes: dict, quantizer: PlanQuantizer) -> tuple[dict, list[str]]:
    """A copy of `schemes` with the plan's lqer_top_k integer tensors of largest quantization error (under their
    assigned scheme) moved to its LQER variant; and those names, largest error first."""
    if spec.lqer_top_k <= 0:
        return dict(schemes), []
    plain = [name for name, scheme in schemes.items() if SCHEMES[scheme].integer and "+lqer" not in scheme]
    errors = {name: quantizer.quantization_error(name, schemes[name]) for name in plain}
    chosen = sorted(plain, key=lambda name: (-errors[name], name))[: spec.lqer_top_k]
    return {name: lqer_scheme(scheme, spec.lqer_bits) if name in chosen else scheme
            for name, scheme in schemes.items()}, chosen


def quantized_plan(
    model_config: dict,
    source: dict,
    spec: PlanSpec,
    clip: str,
    records: dict,
    tokenizer_sha256: str | None = None,
) -> dict:
    """plan.json: {"model_config", "tokenizer_sha256", "source", "plan", "tensors"} (docs/INTERNALS.md); the
    tokenizer digest (from the checkpoint's metadata) lets eval refuse a mismatched tokenizer."""
    return {
        "format_version": QUANTIZED_FORMAT_VERSION,
        "model_config": model_config,
        "tokenizer_sha256": tokenizer_sha256,
        "source": source,
        "plan": {**spec.to_dict(), "clip": clip},
        "tensors": records,
    }
