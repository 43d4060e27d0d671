"""The GPT that `pgolf train` trains: the challenge's naive baseline, plus each seed-submission technique as a
`ModelConfig` field (all off by default, so `ModelConfig()` is the baseline: 9 layers x 512, 8 heads / 4 KV
heads, MLP 2x relu^2, tied embeddings, U-Net skips, RoPE, q-gain 1.5, softcap 30; 17,059,912 parameters).

Module and parameter names are stable; eval's LoRA TTT, QAT plans and the quantizer address them by name:
    tok_emb                                  token embedding (also the output head when tied)
    bigram.embed / bigram.proj / bigram.scale   BigramHash (bigram_buckets > 0)
    smear.gate                               SmearGate (smear_gate)
    token_smear.gate / token_smear.strength  input-dependent SmearGate (smear_gate_width > 0)
    value_embed.embed / .proj / .scale / .layer_scales   value embeddings (value_embed_layers)
    blocks.{i}.attn.c_q / c_k / c_v / proj   attention projections (CastedLinear)
    blocks.{i}.attn.q_gain                   per-head query gain
    blocks.{i}.attn.head_gate                gated attention, per-head sigmoid gate (gated_attention)
    blocks.{i}.attn.out_gate                 attention output gate from the first input channels
    blocks.{i}.attn.v_mix                    value residual mix with layer 0's values (value_residual, i >= 1)
    blocks.{i}.mlp.fc / mlp.gate / mlp.proj  MLP up / SwiGLU gate (swiglu only) / down projections
    blocks.{i}.attn_scale / mlp_scale / resid_mix   per-channel branch scales and the mix with the embedding
    skip_weights / skip_gates                U-Net skip weights (unet_skips) and their sigmoid gates (skip_gates)
    parallel_resid_lambdas / parallel_post_lambdas   parallel residual lanes (parallel_start_layer > 0)
    lm_head                                  output head (untied only)

Every output position depends only on inputs at or before it: attention is causal, SmearGate and BigramHash
look one token back, and (with bos_isolation, the default) both are masked where the current token is BOS so a
document never sees the previous one. Training can isolate documents in attention too (`isolate_documents`, from
TrainConfig): a query then sees only keys of its own document (document_mask picks the implementation).

Depth recurrence (num_loops > 0) runs blocks loop_start..loop_end num_loops extra times; `GPT.looping` switches
the extra runs off (training turns them on part-way, as the 04-16 record does). `block_layout(config)` lists the
looped order, which is what the exported model runs.
"""

import contextlib
import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.errors import UsageError
from pgolf.quant import fake_quantize, quant_range
from pgolf.shards import BOS_ID

ACTIVATIONS = ("relu2", "leaky_relu2", "swiglu")
GATE_SOURCES = ("input", "q")  # what the attention output gate reads: the normed block input, or the q projection
FINAL_LANES = ("mean", "attn", "mlp")  # which parallel lane (or their mean) becomes the final hidden state
# SDPA learned enable_gqa in torch 2.5; older torch gets the KV heads repeated explicitly.
SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
# How attention keeps documents apart when a forward isolates them (GPT.document_attention); see document_mask.
DOCUMENT_ATTENTION = ("auto", "flex", "sdpa_mask")
# TrainConfig / TTTConfig attention_kernel -> the SDPA kernel attention may use on CUDA (torch.nn.attention names):
# "torch" leaves the choice to torch; "auto" is resolved per run by pick_attention_kernel.
ATTENTION_KERNELS = {"auto": None, "torch": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                     "efficient": "EFFICIENT_ATTENTION"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024  # tokenizer vocabulary (BOS must be id 1)
    num_layers: int = 9  # transformer blocks
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads; must divide model_dim
    num_kv_heads: int = 4  # key/value heads (GQA); must divide num_heads
    mlp_mult: float = 2.0  # MLP hidden width = round(mlp_mult * model_dim)
    activation: str = "relu2"  # MLP nonlinearity: relu2 | leaky_relu2 | swiglu
    leaky_slope: float = 0.5  # negative slope of leaky_relu2
    tie_embeddings: bool = True  # output head shares the token embedding
    tied_embed_init_std: float = 0.005  # init std of the tied embedding
    rope_base: float = 10000.0  # RoPE frequency base
    rope_dims: int = 0  # rotated dims per head (partial RoPE); 0 = the full head dim
    qk_gain_init: float = 1.5  # initial per-head query gain applied after q/k RMS norm
    logit_softcap: float = 30.0  # logits = softcap * tanh(logits / softcap)
    unet_skips: bool = True  # decoder half adds the encoder half's outputs in reverse order
    xsa_last_n: int = 0  # XSA (remove each head's own-value component) on the last N layers; 0 off, -1 all
    smear_gate: bool = False  # blend each position's embedding with the previous one (masked at BOS)
    bigram_buckets: int = 0  # BigramHash table rows (hash of previous and current token); 0 off
    bigram_dim: int = 128  # BigramHash embedding width, projected to model_dim
    orthogonal_init: bool = False  # orthogonal init for large matrices instead of nn.Linear's default
    ln_scale: bool = False  # scale each block's normed inputs by 1/sqrt(layer + 1)
    value_residual: bool = False  # layers >= 1 add a learned share of layer 0's attention values
    gated_attention: bool = False  # per-head sigmoid gate on attention output, from the block input
    attn_out_gate_width: int = 0  # per-head 2*sigmoid output gate from the first N input channels; 0 off
    attn_out_gate_src: str = "input"  # the output gate reads the normed block input, or "q" (the q projection)
    bos_isolation: bool = True  # SmearGate / BigramHash never look back across a BOS (False: records 03-22, 04-16)
    smear_gate_width: int = 0  # input-dependent SmearGate x += lam*sigmoid(W x[:w])*x_prev on the raw embedding; 0 off
    value_embed_layers: tuple[int, ...] = ()  # blocks whose values add a shared token embedding (03-22's VE)
    value_embed_dim: int = 128  # width of that shared table, projected to the KV width
    skip_gates: bool = False  # U-Net skips blend x = lerp(w*skip, x, sigmoid(gate)) instead of adding w*skip
    num_loops: int = 0  # depth recurrence: extra runs of blocks loop_start..loop_end (04-16: 2)
    loop_start: int = 0  # first block of the looped segment
    loop_end: int = 0  # last block of the looped segment (inclusive)
    parallel_start_layer: int = 0  # decoder blocks >= this run attention and MLP on two residual lanes; 0 off
    parallel_final_lane: str = "mean"  # the lanes' final hidden state: mean | attn | mlp
    rope_ntk_seq_len: int = 0  # inputs longer than this scale RoPE's base by (T/this)^(d/(d-2)) (03-22); 0 off
    rope_bf16_freqs: bool = False  # RoPE inverse frequencies rounded to bfloat16, as the records' bf16 models hold them
    max_seq_len: int = 1024  # longest sequence the RoPE tables cover; longer inputs are refused

    def __post_init__(self):
        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"{field} = {getattr(self, field)!r}: must be {allowed}")

        need(2 <= self.vocab_size <= 65536, "vocab_size", "in [2, 65536] (uint16 tokens, BOS = 1)")
        need(self.num_layers >= 1, "num_layers", ">= 1")
        need(self.model_dim >= 2, "model_dim", ">= 2")
        need(self.num_heads >= 1 and self.model_dim % self.num_heads == 0, "num_heads",
             f"a positive divisor of model_dim ({self.model_dim})")
        need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"a positive divisor of num_heads ({self.num_heads})")
        need(self.head_dim % 2 == 0, "num_heads", f"such that head_dim = model_dim / num_heads is even, "
             f"got head_dim {self.head_dim}")
        need(self.mlp_mult > 0 and self.mlp_hidden >= 1, "mlp_mult",
             "> 0 with round(mlp_mult * model_dim) >= 1")
        need(self.activation in ACTIVATIONS, "activation", f"one of {', '.join(ACTIVATIONS)}")
        need(0.0 <= self.leaky_slope <= 1.0, "leaky_slope", "in [0, 1]")
        need(self.tied_embed_init_std > 0, "tied_embed_init_std", "> 0")
        need(self.rope_base > 1.0, "rope_base", "> 1")
        need(self.rope_dims == 0 or (2 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0),
             "rope_dims", f"0 (full) or even in [2, head_dim = {self.head_dim}]")
        need(self.logit_softcap > 0, "logit_softcap", "> 0")
        need(-1 <= self.xsa_last_n <= self.num_layers, "xsa_last_n", f"-1 (all), 0 (off) or up to num_layers "
             f"({self.num_layers})")
        need(self.bigram_buckets == 0 or self.bigram_buckets >= 2, "bigram_buckets", "0 (off) or >= 2")
        need(self.bigram_dim >= 1, "bigram_dim", ">= 1")
        need(0 <= self.attn_out_gate_width <= self.model_dim, "attn_out_gate_width",
             f"in [0, model_dim = {self.model_dim}]")
        need(self.attn_out_gate_src in GATE_SOURCES, "attn_out_gate_src", f"one of {', '.join(GATE_SOURCES)}")
        need(0 <= self.smear_gate_width <= self.model_dim, "smear_gate_width", f"in [0, model_dim = {self.model_dim}]")
        need(all(0 <= layer < self.num_layers for layer in self.value_embed_layers)
             and len(set(self.value_embed_layers)) == len(self.value_embed_layers), "value_embed_layers",
             f"distinct block indices in [0, num_layers = {self.num_layers})")
        need(self.value_embed_dim >= 1, "value_embed_dim", ">= 1")
        need(self.num_loops >= 0, "num_loops", ">= 0")
        if self.num_loops:
            need(0 <= self.loop_start <= self.loop_end < self.num_layers, "loop_start",
                 f"<= loop_end ({self.loop_end}), both in [0, num_layers = {self.num_layers})")
        need(0 <= self.parallel_start_layer < self.num_layers, "parallel_start_layer",
             f"0 (off) or a block index below num_layers ({self.num_layers})")
        # A block run again after the lanes split would read the single stream the lanes replaced.
        need(not (self.parallel_start_layer and self.num_loops) or self.parallel_start_layer > self.loop_end,
             "parallel_start_layer", f"past the looped segment (> loop_end = {self.loop_end})")
        need(self.parallel_final_lane in FINAL_LANES, "parallel_final_lane", f"one of {', '.join(FINAL_LANES)}")
        need(self.rope_ntk_seq_len >= 0, "rope_ntk_seq_len", ">= 0 (0 = off)")
        need(self.max_seq_len >= 1, "max_seq_len", ">= 1")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_mult * self.model_dim))

    def xsa_layers(self) -> range:
        first = 0 if self.xsa_last_n == -1 else self.num_layers - self.xsa_last_n
        return range(first, self.num_layers)


BLOCK_PREFIX = "blocks."
HEAD_PREFIXES = ("tok_emb.", "lm_head.")  # the output head: lm_head, or the tied token embedding


def block_index(name: str) -> int | None:
    """The block a parameter name belongs to (`blocks.<i>.` ...), or None for inputs, skips and the head."""
    if not name.startswith(BLOCK_PREFIX):
        return None
    index = name[len(BLOCK_PREFIX):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """The model's own description of its blocks: which parameters belong to which logical block, and the order
    the forward runs the blocks in (`execution`; a block run more than once appears more than once). Plans
    demote whole blocks, GPTQ calibrates in forward order, the center-out fit starts in the middle and TTT
    freezes the first blocks, all through this one description."""

    num_blocks: int
    execution: tuple[int, ...]

    def block_of(self, name: str) -> int | None:
        index = block_index(name)
        return index if index is not None and index < self.num_blocks else None

    def prefix(self, block: int) -> str:
        return f"{BLOCK_PREFIX}{block}."

    def runs(self, block: int) -> int:
        """How many times one forward executes `block`."""
        return self.execution.count(block)

    def first_blocks(self, count: int) -> list[int]:
        """The first `count` distinct blocks the forward runs."""
        return list(dict.fromkeys(self.execution))[:count]

    def center_out(self) -> list[int]:
        """The middle block first, then alternately one below and one above, outward: 9 -> 4 3 5 2 6 1 7 0 8."""
        center = self.num_blocks // 2
        order = [center]
        for distance in range(1, self.num_blocks):
            order += [b for b in (center - distance, center + distance) if 0 <= b < self.num_blocks]
        return order

    def forward_group(self, name: str) -> int:
        """Calibration order of a parameter: 0 for the inputs read before any block, 1 + the position of its
        block's first run, and last the output head (the tied embedding counts as the head)."""
        block = self.block_of(name)
        if block is not None:
            return 1 + self.execution.index(block)
        return len(self.execution) + 1 if name.startswith(HEAD_PREFIXES) else 0


def block_layout(config: ModelConfig, looping: bool = True) -> BlockLayout:
    """The layout GPT(config) runs (a pure function of the config: plans read it without building a model).

    With depth recurrence the looped segment runs 1 + num_loops times: 11 blocks, loop 3..5 twice more ->
    0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10. `looping=False` is the order before training turns the loops on."""
    order = list(range(config.num_layers))
    if config.num_loops and looping:
        segment = order[config.loop_start : config.loop_end + 1]
        order = order[: config.loop_start] + segment * (1 + config.num_loops) + order[config.loop_end + 1 :]
    return BlockLayout(config.num_layers, tuple(order))


def encoder_length(config: ModelConfig, layout: BlockLayout) -> int:
    """How many of the layout's first block runs feed U-Net skips (half of them; none without skips)."""
    return len(layout.execution) // 2 if config.unet_skips else 0


class CastedLinear(nn.Linear):
    """A linear layer whose fp32 weight is cast to the input's dtype at matmul time (bf16 compute, fp32
    master weights).

    With `qat_bits` set (see set_qat_plan) and the `qat_on` buffer true, the weight is fake-quantized per row
    with a straight-through estimator. `qat_on` is a tensor, not a Python bool, so torch.compile reads it at
    run time instead of constant-folding the value it had when the graph was traced.
    """

    control = False  # True for small gate matrices that belong with the scalars (Adam, kept in float)
    zero_init = False  # True for output projections, which start at zero so each block starts as identity

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.qat_bits = 0  # 0 = never fake-quantized
        self.register_buffer("qat_on", torch.zeros((), dtype=torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.qat_bits:
            # Forward value is exactly fake_quantize(w); the gradient reaches w unchanged (STE).
            quantized = weight - weight.detach() + fake_quantize(weight.detach(), self.qat_bits)
            weight = torch.where(self.qat_on, quantized, weight)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight.to(x.dtype), bias)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_seq_len, rotated_dims / 2] in float32."""
    dims = config.rope_dims or config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    if config.rope_bf16_freqs:  # the records cast their whole model to bf16, RoPE's frequency buffer included
        inv_freq = inv_freq.bfloat16().float()
    freqs = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.size(-1) dims of each head (half-split pairing); the rest pass through."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    rotated = (x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos)
    return torch.cat(rotated + (rest,) if rest.size(-1) else rotated, dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        dim, kv_dim = config.model_dim, config.num_kv_heads * config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim)
        self.proj.zero_init = True
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        self.xsa = layer in config.xsa_layers()
        self.v_mix = nn.Parameter(torch.zeros(1)) if config.value_residual and layer > 0 else None
        self.head_gate = None
        if config.gated_attention:
            self.head_gate = CastedLinear(dim, config.num_heads, bias=True)
            self.head_gate.control = True
        self.out_gate = None
        self.out_gate_width = config.attn_out_gate_width
        self.out_gate_from_q = config.attn_out_gate_src == "q"
        if self.out_gate_width:
            self.out_gate = CastedLinear(self.out_gate_width, config.num_heads)
            self.out_gate.control = True

    def reset_gates(self) -> None:
        # Gated attention starts nearly open (sigmoid(4) = 0.98); the output gate starts at exactly 1.
        if self.head_gate is not None:
            nn.init.zeros_(self.head_gate.weight)
            nn.init.constant_(self.head_gate.bias, 4.0)
        if self.out_gate is not None:
            nn.init.zeros_(self.out_gate.weight)

    def forward(self, x, cos, sin, v0, value_embed=None, mask=None):
        """x: [B, T, D] normed block input; v0: layer 0's values (value residual) or None; value_embed: [B, T,
        kv_dim] added to the values or None; mask: document_mask's mask (attention stays inside a document) or
        None (plain causal). Returns the projected output and this layer's values."""
        batch, seq_len, dim = x.shape
        q_raw = self.c_q(x)
        q = q_raw.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if value_embed is not None:
            v = v + value_embed
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.v_mix is not None:
            v = v + torch.sigmoid(self.v_mix.to(v.dtype)) * v0
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = attend(q, k, v, mask)
        if self.xsa:
            y = remove_self_value(y, v)
        if self.head_gate is not None:
            y = y * torch.sigmoid(self.head_gate(x)).transpose(1, 2)[..., None]
        if self.out_gate is not None:
            source = q_raw if self.out_gate_from_q else x
            gate = 2.0 * torch.sigmoid(self.out_gate(source[..., : self.out_gate_width]))
            y = y * gate.transpose(1, 2)[..., None]
        y = y.transpose(1, 2).reshape(batch, seq_len, dim)
        return self.proj(y), v


def flex_attention_api():
    """(create_block_mask, flex_attention), or None where torch has no flex_attention with GQA (before 2.5).
    Imported here, not at the top, so the model (and a bundled submission) still loads on older torch."""
    if not SDPA_HAS_GQA:
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return create_block_mask, flex_attention


def document_attention_kind(device: torch.device, requested: str = "auto") -> str:
    """The implementation a document-isolated forward uses: `requested`, or for "auto":

    - "flex" on CUDA while torch.compile traces the model: flex_attention with a document + causal BlockMask,
      which Inductor compiles into one fused kernel that skips the key blocks the mask empties (other
      documents, the future), where a dense mask pays for every block (benchmarks/doc_attention.py measures
      both against plain causal attention). Under the aot_eager debug backend it runs unfused: exact, slower.
    - "sdpa_mask" otherwise: SDPA with a dense [B, 1, T, T] bool mask. Exact everywhere, but an explicit mask
      keeps SDPA off its flash kernel (memory-efficient or math kernel instead). Outside torch.compile,
      flex_attention runs an unfused reference that materializes every score, and it has no backward on CPU."""
    if requested not in DOCUMENT_ATTENTION:
        raise ValueError(f"document attention {requested!r}: must be one of {', '.join(DOCUMENT_ATTENTION)}")
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.compiler.is_compiling() and flex_attention_api() is not None:
        return "flex"
    return "sdpa_mask"


def document_mask(input_ids: torch.Tensor, kind: str = "auto"):
    """What attend() needs to keep each query inside its own document and causal, built once per forward: the
    document index of a position is the count of BOS tokens up to it (a row that starts mid-document has index
    0 until its first BOS). A BlockMask for "flex", a [B, 1, T, T] bool mask for "sdpa_mask"."""
    kind = document_attention_kind(input_ids.device, kind)
    documents = torch.cumsum(input_ids == BOS_ID, dim=1)
    batch, seq_len = input_ids.shape
    if kind == "flex":
        api = flex_attention_api()
        if api is None:
            raise RuntimeError(f"flex_attention needs torch >= 2.5 (this is {torch.__version__})")

        def same_document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

        return api[0](same_document_causal, batch, None, seq_len, seq_len, device=input_ids.device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def attention_kernels(name: str, device: torch.device):
    """A context in which SDPA uses only the kernel ATTENTION_KERNELS[name] names, on CUDA (what runs and what
    torch.compile traces inside it, backward included); elsewhere, or for "torch" and an unresolved "auto" (TTT's),
    torch's own choice.

    torch.compile turns SDPA into the chosen kernel's own op, but its on-disk caches (Inductor's FX graph cache,
    AOTAutograd's) leave the kernel choice out of their key (pytorch/pytorch#185449): a graph compiled earlier
    under another kernel would be served and run that kernel, silently. Inside this context the kernel is part
    of their key (compile_cache_scope), so a rerun of the same model and kernel still compiles from the cache."""
    kernel = ATTENTION_KERNELS[name]
    if kernel is None or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([getattr(SDPBackend, kernel)]))
    stack.enter_context(compile_cache_scope(f"pgolf-sdpa-{name}"))
    return stack


def compile_cache_scope(tag: str):
    """A context in which torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's) store and
    serve graphs under `tag` too (torch.compiler.config.cache_key_tag, appended to any tag already set), so what
    compiles inside is never served to a compile outside it or under another tag; a torch without the tag
    (before 2.6) compiles with both caches off instead."""
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag"):
        return config.patch(cache_key_tag=f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag)
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config
    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(fx_graph_cache=False))
    stack.enter_context(aot_config.patch(enable_autograd_cache=False))
    return stack


def attention_kernel_problem(name: str, config: "ModelConfig", device: torch.device, dtype: torch.dtype,
                             seq_len: int = 128) -> str | None:
    """Why SDPA kernel `name` cannot run this model's causal attention (its head counts and head size, `dtype`)
    forward and backward on `device`, or None when it can. The kernel is forced here on any device (the caller
    asks only where attention_kernels applies it): torch's own error would come from deep inside a compiled
    step, minutes in, as a page of warnings."""
    kernel = ATTENTION_KERNELS[name]
    if kernel is None:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def heads(count: int) -> torch.Tensor:
        # [B, H, T, D] views of [B, T, H, D] tensors, as CausalSelfAttention hands them over (a kernel may take
        # one layout and refuse the other); constant values, so the probe draws nothing from training's RNG.
        leaf = torch.ones(1, seq_len, count, config.head_dim, device=device, dtype=dtype, requires_grad=True)
        return leaf.transpose(1, 2)
    q, k, v = heads(config.num_heads), heads(config.num_kv_heads), heads(config.num_kv_heads)
    # torch explains a refusal in warnings, one pair per kernel: keep the forced kernel's reasons only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([getattr(SDPBackend, kernel)]):
                attend(q, k, v).sum().backward()
            return None
        except RuntimeError as error:
            reasons = [str(w.message).strip() for w in caught if "not used because" not in str(w.message)
                       and "runtime disabled" not in str(w.message)] or str(error).strip().splitlines()[:1]
    reason = "; ".join(" ".join(reason.split()) for reason in reasons)  # one line
    return (f"torch {torch.__version__} has no {kernel} kernel for this model's attention ({config.num_heads} "
            f"query / {config.num_kv_heads} key-value heads of {config.head_dim}, {dtype}) on {device}: {reason}")


def require_attention_kernel(setting: str, name: str, config: "ModelConfig", device: torch.device) -> None:
    """Refuse (exit 2, one line) SDPA kernel `name` where attention_kernels would force it (CUDA) and it cannot run
    the model's attention in bf16; checked before any compile or step."""
    if device.type != "cuda":
        return
    problem = attention_kernel_problem(name, config, device, torch.bfloat16)
    if problem:
        raise UsageError(f"{setting} = {name!r}: {problem}")


def pick_attention_kernel(setting: str, name: str, config: "ModelConfig", device: torch.device,
                          masked: bool) -> str:
    """The kernel training runs for attention_kernel `name`: a named kernel as it is (refused, exit 2, where it
    cannot run, see require_attention_kernel); "auto" resolves to "cudnn" on CUDA for causal attention without a
    document mask where cuDNN runs this model's heads (the baseline preset's step on an H100: 0.79x the challenge
    script's with cuDNN, 0.90x with torch's own pick, FA2; benchmarks/RESULTS.md), else to "torch"."""
    if name != "auto":
        require_attention_kernel(setting, name, config, device)
        return name
    if device.type != "cuda" or masked or attention_kernel_problem("cudnn", config, device, torch.bfloat16):
        return "torch"
    return "cudnn"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Causal attention on [B, H, T, D] queries and [B, H_kv, T, D] keys/values; `mask` from document_mask
    (a bool tensor: SDPA with it; a flex BlockMask: flex_attention) or None (causal SDPA, the flash kernel)."""
    group = q.size(1) // k.size(1)
    if mask is not None and not isinstance(mask, torch.Tensor):
        # flex_attention needs one dtype and, unlike SDPA, has no autocast rule in every torch: under autocast
        # v is bf16 (a linear's output), so q and k follow it, as SDPA's autocast cast would do.
        return flex_attention_api()[1](q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=group > 1)
    options = dict(is_causal=mask is None, attn_mask=mask)
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, **options)
    # enable_gqa runs on SDPA's flash and math kernels only; with a mask (no flash) the repeated KV heads let the
    # memory-efficient kernel take it instead of math, which would hold every [T, T] score in fp32.
    if SDPA_HAS_GQA and mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **options)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **options)


def remove_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: subtract from each head's output its component along its own normalized value at that position."""
    batch, heads, seq_len, head_dim = y.shape
    grouped = y.view(batch, v.size(1), heads // v.size(1), seq_len, head_dim)
    unit_v = F.normalize(v, dim=-1).unsqueeze(2)
    grouped = grouped - (grouped * unit_v).sum(dim=-1, keepdim=True) * unit_v
    return grouped.view(batch, heads, seq_len, head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation, self.leaky_slope = config.activation, config.leaky_slope
        self.fc = CastedLinear(config.model_dim, config.mlp_hidden)
        swiglu = config.activation == "swiglu"
        self.gate = CastedLinear(config.model_dim, config.mlp_hidden) if swiglu else None
        self.proj = CastedLinear(config.mlp_hidden, config.model_dim)
        self.proj.zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        if self.activation == "leaky_relu2":
            return self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        dim = config.model_dim
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if config.ln_scale else None

    def forward(self, x, x0, cos, sin, v0, value_embed=None, mask=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        attn_out, v = self.attn(self.norm(x), cos, sin, v0, value_embed, mask)
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * attn_out
        x = x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.norm(x))
        return x, v

    def parallel(self, lanes, x0, cos, sin, v0, value_embed, mask, resid, post):
        """Parallel residual lanes (04-16): attention reads lane 0 (mixed with x0), the MLP reads lane 1, and
        both outputs go to both lanes: lane_j = resid[j] * lane_j + post[0, j] * attn + post[1, j] * mlp."""
        attn_lane, mlp_lane = lanes
        mix = self.resid_mix.to(attn_lane.dtype)
        attn_in = mix[0][None, None, :] * attn_lane + mix[1][None, None, :] * x0
        attn_out, v = self.attn(self.norm(attn_in), cos, sin, v0, value_embed, mask)
        attn_out = self.attn_scale.to(attn_out.dtype)[None, None, :] * attn_out
        mlp_out = self.mlp_scale.to(mlp_lane.dtype)[None, None, :] * self.mlp(self.norm(mlp_lane))
        resid, post = resid.to(attn_lane.dtype), post.to(attn_lane.dtype)
        attn_lane = resid[0] * attn_lane + post[0, 0] * attn_out + post[1, 0] * mlp_out
        mlp_lane = resid[1] * mlp_lane + post[0, 1] * attn_out + post[1, 1] * mlp_out
        return (attn_lane, mlp_lane), v

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) if self.norm_scale is None else rms_norm(x) * self.norm_scale


class SmearGate(nn.Module):
    """x[t] <- lerp(x[t], x[t-1], sigmoid(gate)) per channel, off where token t is BOS when `bos_mask`."""

    def __init__(self, dim: int, bos_mask: bool = True):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.bos_mask = bos_mask

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        weight = torch.sigmoid(self.gate.to(x.dtype))[None, None, :]
        if self.bos_mask:
            weight = weight * (input_ids != BOS_ID)[..., None].to(x.dtype)
        return x + weight * (previous - x)


class TokenSmearGate(nn.Module):
    """Input-dependent SmearGate (modded-nanogpt; the 04-16 record), on the raw token embedding:
    x[t] += strength * sigmoid(gate(x[t][:width])) * x[t-1] for t >= 1, off where token t is BOS when `bos_mask`.
    Zero-initialised (strength 0), so it starts as the identity."""

    def __init__(self, width: int, bos_mask: bool):
        super().__init__()
        self.width, self.bos_mask = width, bos_mask
        self.gate = CastedLinear(width, 1)
        self.gate.control = True
        self.gate.zero_init = True
        self.strength = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.strength.to(x.dtype) * torch.sigmoid(self.gate(x[:, 1:, : self.width]))
        if self.bos_mask:
            weight = weight * (input_ids[:, 1:, None] != BOS_ID).to(x.dtype)
        return torch.cat((x[:, :1], x[:, 1:] + weight * x[:, :-1]), dim=1)


class ValueEmbedding(nn.Module):
    """A token embedding added to the attention values of some blocks (03-22's VE): one shared table projected
    to the KV width and scaled, times a learned scale per block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        kv_dim = config.num_kv_heads * config.head_dim
        self.layers = config.value_embed_layers
        self.embed = nn.Embedding(config.vocab_size, config.value_embed_dim)
        self.proj = CastedLinear(config.value_embed_dim, kv_dim)
        self.proj.zero_init = True
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.Parameter(torch.ones(len(self.layers)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        shared = self.proj(self.embed(input_ids))
        return shared * self.scale.to(shared.dtype)

    def for_block(self, shared: torch.Tensor, block: int) -> torch.Tensor | None:
        if block not in self.layers:
            return None
        return shared * self.layer_scales[self.layers.index(block)].to(shared.dtype)


class BigramHash(nn.Module):
    """Embedding of hash(previous token, current token) in `buckets - 1` rows, projected to the model width.

    The last row stands for "no previous token": the first position, and every BOS (documents stay apart).
    """

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_mask: bool = True):
        super().__init__()
        self.buckets, self.bos_mask = buckets, bos_mask
        self.embed = nn.Embedding(buckets, dim)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        previous = F.pad(input_ids[:, :-1], (1, 0))
        hashed = torch.bitwise_xor(36313 * input_ids, 27191 * previous) % (self.buckets - 1)
        first = torch.arange(input_ids.size(1), device=input_ids.device) == 0
        fresh = (input_ids == BOS_ID) | first if self.bos_mask else first
        return torch.where(fresh, self.buckets - 1, hashed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        projected = self.proj(self.embed(self.bucket_ids(input_ids)))
        return projected * self.scale.to(projected.dtype)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, init_weights: bool = True):
        """`init_weights=False` skips the training init (orthogonal init runs a QR per matrix) for a model whose
        state dict is loaded next."""
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        self.bigram = BigramHash(config.bigram_buckets, config.bigram_dim, config.model_dim, config.bos_isolation) \
            if config.bigram_buckets else None
        self.smear = SmearGate(config.model_dim, config.bos_isolation) if config.smear_gate else None
        self.token_smear = TokenSmearGate(config.smear_gate_width, config.bos_isolation) \
            if config.smear_gate_width else None
        self.value_embed = ValueEmbedding(config) if config.value_embed_layers else None
        self.layout = block_layout(config)
        self.looping = True  # run the looped segment's extra passes (training turns this on part-way)
        self.document_attention = "auto"  # isolate_documents' implementation, one of DOCUMENT_ATTENTION
        encoder = encoder_length(config, self.layout)
        num_skips = min(encoder, len(self.layout.execution) - encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim)) if num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, config.model_dim)) \
            if num_skips and config.skip_gates else None
        self.parallel_resid_lambdas = self.parallel_post_lambdas = None
        if config.parallel_start_layer:
            self.parallel_resid_lambdas = nn.Parameter(torch.full((config.num_layers, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(config.num_layers, 2, 2))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = CastedLinear(config.model_dim, config.vocab_size)
            self.lm_head.zero_init = True
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        config = self.config
        if config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=config.tied_embed_init_std)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
        if self.value_embed is not None:
            nn.init.normal_(self.value_embed.embed.weight, std=0.01)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear):
                continue
            if module.zero_init:
                nn.init.zeros_(module.weight)
            elif module.control:
                continue
            elif config.orthogonal_init and min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)
                if name == "bigram.proj":  # an extra input branch: keep its start small, as the seed did
                    module.weight.data.mul_(1.0 / math.sqrt(2 * config.num_layers))
        for block in self.blocks:
            block.attn.reset_gates()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """x0: the normed token (+ bigram) embedding, smeared with the previous position when enabled (the
        input-dependent SmearGate before the norm, the per-channel one after it)."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if self.token_smear is not None:
            x = self.token_smear(x, input_ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, input_ids)
        return x

    def rotary(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, 1, T, rotated / 2]; past rope_ntk_seq_len the base is rescaled for this length."""
        config = self.config
        if seq_len > config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {config.max_seq_len}")
        if config.rope_ntk_seq_len and seq_len > config.rope_ntk_seq_len:
            dims = config.rope_dims or config.head_dim
            base = config.rope_base * (seq_len / config.rope_ntk_seq_len) ** (dims / (dims - 2))
            # 03-22 computes these frequencies afresh in float32: never rounded to bf16.
            rescaled = dataclasses.replace(config, rope_base=base, max_seq_len=seq_len, rope_bf16_freqs=False)
            cos, sin = rotary_tables(rescaled)
            return cos.to(self.rope_cos.device)[None, None], sin.to(self.rope_sin.device)[None, None]
        return self.rope_cos[None, None, :seq_len], self.rope_sin[None, None, :seq_len]

    def hidden(self, input_ids: torch.Tensor, isolate_documents: bool = False, mask=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, model_dim]. `isolate_documents`: attention never crosses a BOS
        (document-packed training, as the 04-10 / 04-16 records train; scoring always attends across the whole
        window). RoPE is relative, so a document's output does not depend on where in the row it starts.
        `mask`: document_mask(input_ids) built by the caller (isolates documents; e.g. a flex BlockMask built
        outside torch.compile, so its construction is not traced into the model's graph)."""
        config = self.config
        cos, sin = self.rotary(input_ids.size(1))
        if mask is None and isolate_documents:
            mask = document_mask(input_ids, self.document_attention)
        layout = self.layout if self.looping else block_layout(config, looping=False)
        encoder = encoder_length(config, layout)
        x0 = self.embed(input_ids)
        shared_values = self.value_embed(input_ids) if self.value_embed is not None else None
        x, v0, skips, lanes = x0, None, [], None
        for position, index in enumerate(layout.execution):
            block = self.blocks[index]
            decoder = position - encoder
            parallel = decoder >= 0 and 0 < config.parallel_start_layer <= index
            if parallel and lanes is None:
                lanes = (x, x)
            if decoder >= 0 and skips and decoder < self.skip_weights.size(0):
                stream = lanes[0] if parallel else x
                skip = self.skip_weights[decoder].to(stream.dtype)[None, None, :] * skips.pop()
                if self.skip_gates is not None:
                    gate = torch.sigmoid(self.skip_gates[decoder].to(stream.dtype))[None, None, :]
                    stream = torch.lerp(skip, stream, gate)
                else:
                    stream = stream + skip
                if parallel:
                    lanes = (stream, lanes[1])
                else:
                    x = stream
            value_embed = self.value_embed.for_block(shared_values, index) if shared_values is not None else None
            if parallel:
                lanes, v = block.parallel(lanes, x0, cos, sin, v0, value_embed, mask,
                                          self.parallel_resid_lambdas[index], self.parallel_post_lambdas[index])
            else:
                x, v = block(x, x0, cos, sin, v0, value_embed, mask)
            if position == 0 and config.value_residual:
                v0 = v
            if position < encoder:
                skips.append(x)
        if lanes is not None:
            x = {"mean": lambda: 0.5 * (lanes[0] + lanes[1]), "attn": lambda: lanes[0],
                 "mlp": lambda: lanes[1]}[config.parallel_final_lane]()
        return rms_norm(x)

    def logits_from_hidden(self, hidden: torch.Tensor, head_delta=None) -> torch.Tensor:
        """Softcapped logits of final hidden states [..., D]; float32 (float64 for a float64 model).
        `head_delta(hidden)`, when given, is added to the raw head output before the softcap (LoRA TTT's
        lm_head adapter, tied or untied)."""
        if self.lm_head is not None:
            raw = self.lm_head(hidden)
        else:
            raw = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        if head_delta is not None:
            raw = raw + head_delta(hidden)
        softcap = self.config.logit_softcap
        logits = softcap * torch.tanh(raw / softcap)
        return logits if logits.dtype == torch.float64 else logits.float()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Softcapped logits [B, T, vocab_size], float32 (float64 for a float64 model)."""
        return self.logits_from_hidden(self.hidden(input_ids))

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                isolate_documents: bool = False, mask=None) -> torch.Tensor:
        """Mean cross-entropy (nats, float32) of target_ids given input_ids; both int64 [B, T]. `isolate_documents`
        and `mask` as for hidden()."""
        logits = self.logits_from_hidden(self.hidden(input_ids, isolate_documents, mask))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")


def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Optimizer groups: "matrix" (block, bigram and value-embedding projection matrices: Muon), "embed" (token,
    bigram and value-embedding tables), "scalar" (vectors, gains, mixes, skip weights and gates, lane lambdas and
    small gate matrices), "head" (untied only)."""
    matrices = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, CastedLinear) and not module.control and name != "lm_head"
    }
    embeds = {id(model.tok_emb.weight)}
    if model.bigram is not None:
        embeds.add(id(model.bigram.embed.weight))
    if model.value_embed is not None:
        embeds.add(id(model.value_embed.embed.weight))
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "scalar": []}
    if model.lm_head is not None:
        groups["head"] = [model.lm_head.weight]
    for param in model.parameters():
        if id(param) in matrices:
            groups["matrix"].append(param)
        elif id(param) in embeds:
            groups["embed"].append(param)
        elif model.lm_head is None or param is not model.lm_head.weight:
            groups["scalar"].append(param)
    return groups


def casted_linear_names(model: nn.Module) -> list[str]:
    """Names of every CastedLinear module (the layers QAT plans and LoRA TTT can target)."""
    return [name for name, module in model.named_modules() if isinstance(module, CastedLinear)]


def set_qat_plan(model: nn.Module, plan: dict[str, int]) -> None:
    """Fake-quantize these layers (module name, or its `.weight`) at these bit widths; all others stop.

    The plan takes effect while set_qat_enabled(model, True); changing it after torch.compile recompiles.
    """
    modules = dict(model.named_modules())
    bits_by_module = {}
    for name, bits in plan.items():
        module_name = name.removesuffix(".weight")
        if not isinstance(modules.get(module_name), CastedLinear):
            raise ValueError(f"QAT plan names '{name}', which is not a CastedLinear layer of the model")
        quant_range(bits)
        bits_by_module[module_name] = int(bits)
    for name, module in modules.items():
        if isinstance(module, CastedLinear):
            module.qat_bits = bits_by_module.get(name, 0)


@torch.no_grad()
def set_qat_enabled(model: nn.Module, on: bool) -> None:
    """Switch fake quantization on or off in place (a buffer write, so compiled graphs see it)."""
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.qat_on.fill_(bool(on))


def build_model(state: dict, config: ModelConfig, device, dtype=torch.float32) -> GPT:
    """GPT(config) with exactly these weights (shapes were checked on load), on `device`, in eval mode."""
    model = GPT(config, init_weights=False)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
