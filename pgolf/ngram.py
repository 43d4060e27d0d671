"""Legal n-gram eval cache: a full normalized distribution over the vocabulary, from already-scored tokens.

For each order k in 2..K the previous k-1 tokens are hashed into one of `buckets` rows of a count table
[buckets, V]; row r, column v counts how often v followed a context that hashed to r. A context's distribution
is its whole row, so it is normalized by construction (unlike the seeds' target-keyed lookup, whose implied
distribution sums to >> 1 and was ruled illegal). Orders are interpolated with Witten-Bell smoothing, from the
uniform distribution up through the unigram counts to order K:

    p_k(v) = (c_k(v) + T_k * p_{k-1}(v)) / (n_k + T_k)    n_k: row total, T_k: distinct followers in the row

and p_k = p_{k-1} where the row is empty, so an unseen context backs off to the next lower order. Hash
collisions only merge rows (more distinct followers, hence more weight on the lower order); every p_k still
sums to 1. The mixture with the model, log((1 - a) * p_model + a * p_ngram), is a distribution over the
vocabulary too.

alpha_mode "entropy" follows the seed records (PR #702 / #727 lineage):
    a = 0.05 + (alpha - 0.05) * sigmoid(2 * (H - 4)),   H = the model distribution's entropy in nats
(their `-(softmax * log_softmax).sum(-1)`). `alpha` is the ceiling: alpha = 0.6 gives the records'
0.05 + 0.55 * sigmoid(2 * (H - 4)), alpha = 0.4 the earlier 0.35 range.

Legality (C3): `mix` reads only what `update` counted and refuses a target whose position is already counted.
The eval scores a batch of targets with `mix`, then calls `update(tokens, last_target_position + 1)`.

Token tilt (the 04-09 record's causal tilt with PR #2135's token-only gates): a hint h for each target is read
from the same count tables, the most frequent follower of the longest context (order <= K, down to 2) whose row
has been seen at least `min_count` times and gives h at least a `threshold` share of its followers; the gate
looks only at those prefix counts, never at the target (the within-word / word-start gates of the #1967 lineage
looked at the realized token and broke C1). The model's distribution is tilted toward h:

    p'(v) = p(v) * exp(b * [v = h]) / Z,    Z = 1 + q_h * (exp(b) - 1),    q_h = p(h)

normalized by construction for any b >= 0 (Z is the tilted mass). b = boost * (1 - q_h)^gamma: gamma 0 is the
fixed boost, gamma > 0 PR #2129's confidence-adaptive one (no tilt where the model already agrees). Targets
without a hint keep p.

Memory: (order - 1) * buckets * V int32 counts; order 7 with 65,536 buckets is 1.6 GB at V = 1024 and 12.9 GB
at V = 8192.
"""

from dataclasses import dataclass

import torch

from pgolf.errors import ComplianceError

NGRAM_ALPHA_MODES = ("fixed", "entropy")
NGRAM_MAX_ORDER = 16
NGRAM_MAX_BUCKETS = 1 << 24
# Entropy-adaptive alpha of the seed records: floor + (alpha - floor) * sigmoid(slope * (H - center)).
NGRAM_ENTROPY_FLOOR = 0.05
NGRAM_ENTROPY_CENTER = 4.0  # nats
NGRAM_ENTROPY_SLOPE = 2.0
# Polynomial context hash modulo a Mersenne prime: products stay below 2^62, so int64 never overflows and
# CPU and CUDA give the same rows.
NGRAM_HASH_PRIME = (1 << 31) - 1
NGRAM_HASH_MULTIPLIER = 1_000_003
# Elements of one [rows, V] working block (64 MB of float32), bounding the memory of mix and update.
NGRAM_BLOCK_ELEMENTS = 1 << 24
TILT_MAX_BOOST = 20.0  # exp(20) ~ 5e8: far past any useful tilt, still finite in float32


@dataclass(frozen=True)
class NgramConfig:
    order: int = 7  # highest n-gram order K: orders 2..K (contexts of 1..K-1 tokens) over unigram counts
    alpha: float = 0.4  # weight of the n-gram distribution (fixed mode), or its ceiling (entropy mode)
    alpha_mode: str = "fixed"  # fixed | entropy (weight rises with the model's entropy in nats)
    buckets: int = 65536  # hashed context rows per order; memory (order - 1) * buckets * V * 4 bytes

    def __post_init__(self):
        if not 2 <= self.order <= NGRAM_MAX_ORDER:
            raise ValueError(f"order = {self.order}: must be in [2, {NGRAM_MAX_ORDER}]")
        if self.alpha_mode not in NGRAM_ALPHA_MODES:
            modes = ", ".join(NGRAM_ALPHA_MODES)
            raise ValueError(f"alpha_mode = {self.alpha_mode!r}: must be one of {modes}")
        if self.alpha_mode == "fixed" and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha = {self.alpha}: must be in [0, 1] (0 = the model alone)")
        if self.alpha_mode == "entropy" and not NGRAM_ENTROPY_FLOOR <= self.alpha <= 1.0:
            raise ValueError(f"alpha = {self.alpha}: must be in [{NGRAM_ENTROPY_FLOOR}, 1] with alpha_mode "
                             f"entropy (it is the ceiling; the floor is {NGRAM_ENTROPY_FLOOR})")
        if not 1 <= self.buckets <= NGRAM_MAX_BUCKETS:
            raise ValueError(f"buckets = {self.buckets}: must be in [1, {NGRAM_MAX_BUCKETS}]")

    def table_bytes(self, vocab_size: int) -> int:
        """Memory of the count tables for this vocabulary."""
        return (self.order - 1) * self.buckets * vocab_size * 4


@dataclass(frozen=True)
class TiltConfig:
    order: int = 8  # longest hint context: the previous order - 1 tokens (backs off to shorter contexts)
    boost: float = 1.0  # b, the log-odds added to the hinted token (0 = no tilt)
    threshold: float = 0.5  # gate: the hint's share of its context row's counts must reach this
    min_count: int = 2  # gate: the context row must hold at least this many counted followers
    gamma: float = 0.0  # adaptive boost b * (1 - q_hint)^gamma; 0 = fixed
    buckets: int = 65536  # hashed context rows per order (the n-gram cache's tables, shared in a sweep)

    def __post_init__(self):
        if not 2 <= self.order <= NGRAM_MAX_ORDER:
            raise ValueError(f"tilt order = {self.order}: must be in [2, {NGRAM_MAX_ORDER}]")
        if not 0.0 <= self.boost <= TILT_MAX_BOOST:
            raise ValueError(f"tilt boost = {self.boost}: must be in [0, {TILT_MAX_BOOST:g}]")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"tilt threshold = {self.threshold}: must be in (0, 1]")
        if self.min_count < 1:
            raise ValueError(f"tilt min_count = {self.min_count}: must be >= 1")
        if self.gamma < 0.0:
            raise ValueError(f"tilt gamma = {self.gamma}: must be >= 0 (0 = fixed boost)")
        if not 1 <= self.buckets <= NGRAM_MAX_BUCKETS:
            raise ValueError(f"buckets = {self.buckets}: must be in [1, {NGRAM_MAX_BUCKETS}]")


class NgramMixer:
    """Count tables of orders 1..K on `device`, and the mixture of their distribution with the model's."""

    def __init__(self, config: NgramConfig, vocab_size: int, device):
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.unigram = torch.zeros(vocab_size, dtype=torch.int64, device=self.device)
        # tables[j] holds order j + 2: contexts of the j + 1 previous tokens.
        self.tables = [
            torch.zeros(config.buckets, vocab_size, dtype=torch.int32, device=self.device)
            for _ in range(config.order - 1)
        ]
        self.counted_upto = 0  # the tokens at positions < counted_upto are in the counts

    def context_rows(self, tokens: torch.Tensor, positions: torch.Tensor):
        """Rows [n, K-1] of the contexts before each position (column j: the j + 1 previous tokens), and
        whether that context lies inside the stream."""
        depth = self.config.order - 1
        indices = positions[:, None] - torch.arange(1, depth + 1, device=self.device)[None, :]
        valid = indices >= 0
        previous = tokens[indices.clamp_min(0).to(tokens.device)].to(self.device, torch.int64)
        rows = torch.empty_like(previous)
        hashed = torch.zeros_like(positions)
        for j in range(depth):
            hashed = (hashed * NGRAM_HASH_MULTIPLIER + previous[:, j] + 1) % NGRAM_HASH_PRIME
            rows[:, j] = hashed % self.config.buckets
        return rows, valid

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, upto_position: int) -> None:
        """Count each token at positions [counted_upto, upto_position) as the follower of its contexts."""
        start, end = self.counted_upto, int(upto_position)
        if end <= start:
            return
        if end > len(tokens):
            raise ValueError(f"upto_position {end} is past the end of the {len(tokens)}-token stream")
        step = max(1, NGRAM_BLOCK_ELEMENTS // self.config.order)
        for block_start in range(start, end, step):
            positions = torch.arange(block_start, min(block_start + step, end), device=self.device)
            followers = tokens[positions.to(tokens.device)].to(self.device, torch.int64)
            self.unigram += torch.bincount(followers, minlength=self.vocab_size)
            rows, valid = self.context_rows(tokens, positions)
            for j, table in enumerate(self.tables):
                keep = valid[:, j]
                flat = rows[keep, j] * self.vocab_size + followers[keep]
                table.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.counted_upto = end

    @torch.no_grad()
    def distributions(self, tokens: torch.Tensor, positions: torch.Tensor, orders, dtype=torch.float32):
        """{k: p_k [n, V]} for each order k in `orders` (2..K) at the targets at `positions`: one pass up the
        interpolation chain, kept at each wanted order (an order sweep shares the tables of its largest)."""
        positions = positions.to(self.device, torch.int64)
        rows, valid = self.context_rows(tokens, positions)
        complete = bool(valid.all())  # only the stream's first K-1 targets lack some context
        uniform = torch.full((1, self.vocab_size), 1.0 / self.vocab_size, dtype=dtype, device=self.device)
        p = ngram_witten_bell(self.unigram.to(dtype)[None, :], uniform).expand(len(positions), -1)
        by_order = {}
        for j, table in enumerate(self.tables[: max(orders) - 1]):
            counts = table[rows[:, j]].to(dtype)
            if not complete:
                counts = counts * valid[:, j, None]
            p = ngram_witten_bell(counts, p)
            if j + 2 in orders:
                by_order[j + 2] = p
        return by_order

    @torch.no_grad()
    def followers(self, tokens: torch.Tensor, positions: torch.Tensor, orders) -> dict:
        """{k: (top follower, its count, row total)}, each [n], of the order-k context rows of the targets at
        `positions`: what a tilt's hint and gates read (prefix counts only)."""
        positions = positions.to(self.device, torch.int64)
        rows, valid = self.context_rows(tokens, positions)
        found = {}
        for k in orders:
            counts = self.tables[k - 2][rows[:, k - 2]] * valid[:, k - 2, None]
            top_count, top = counts.max(-1)
            found[k] = (top, top_count, counts.sum(-1))
        return found

    def distribution(self, tokens: torch.Tensor, positions: torch.Tensor, dtype=torch.float32):
        """p_ngram [n, V] of the highest order for the targets at `positions`; each row sums to 1."""
        return self.distributions(tokens, positions, {self.config.order}, dtype)[self.config.order]

    def alpha(self, model_logprobs: torch.Tensor) -> torch.Tensor:
        """Mixture weight of each target, [n, 1]."""
        return ngram_mixture_weight(self.config, model_logprobs)

    @torch.no_grad()
    def mix(self, context_tokens: torch.Tensor, target_positions: torch.Tensor,
            model_logprobs: torch.Tensor) -> torch.Tensor:
        """log((1 - a) p_model + a p_ngram) [n, V] for the targets at `target_positions` of `context_tokens`.

        model_logprobs [n, V] are the model's log-distributions for those targets (float32 or float64; the
        result keeps that dtype). Raises ComplianceError if a target's own token is already counted (C3)."""
        positions = target_positions.to(self.device, torch.int64).reshape(-1)
        if model_logprobs.shape != (len(positions), self.vocab_size):
            raise ValueError(f"model_logprobs shape {tuple(model_logprobs.shape)} != "
                             f"({len(positions)}, {self.vocab_size})")
        if len(positions) and int(positions.min()) < self.counted_upto:
            raise ComplianceError(
                f"n-gram cache: target position {int(positions.min())} is already counted (the counts cover "
                f"positions < {self.counted_upto}); score a target before update() adds it (C3)")
        dtype = torch.float64 if model_logprobs.dtype == torch.float64 else torch.float32
        model_logprobs = model_logprobs.to(self.device, dtype)
        mixed = torch.empty_like(model_logprobs)
        block = max(1, NGRAM_BLOCK_ELEMENTS // self.vocab_size)
        for start in range(0, len(positions), block):
            end = min(start + block, len(positions))
            model_block = model_logprobs[start:end]
            alpha = self.alpha(model_block)
            p_ngram = self.distribution(context_tokens, positions[start:end], dtype)
            mixed[start:end] = torch.logaddexp(model_block + torch.log1p(-alpha), alpha.log() + p_ngram.log())
        return mixed


def ngram_mixture_weight(config: NgramConfig, model_logprobs: torch.Tensor) -> torch.Tensor:
    """Mixture weight [n, 1] for `config` given the model's log-distributions [n, V]: alpha (fixed mode), or
    the seeds' entropy-adaptive weight with alpha as its ceiling."""
    if config.alpha_mode == "fixed":
        return model_logprobs.new_full((len(model_logprobs), 1), config.alpha)
    probs = model_logprobs.exp()
    entropy = -torch.where(probs > 0, probs * model_logprobs, 0.0).sum(-1, keepdim=True)
    gate = torch.sigmoid(NGRAM_ENTROPY_SLOPE * (entropy - NGRAM_ENTROPY_CENTER))
    return NGRAM_ENTROPY_FLOOR + (config.alpha - NGRAM_ENTROPY_FLOOR) * gate


def ngram_witten_bell(counts: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """(c + T * lower) / (n + T) per row, n the row's total and T its number of distinct followers; a row
    without counts returns `lower`. Each row sums to 1 wherever `lower`'s does."""
    total = counts.sum(-1, keepdim=True)
    types = (counts > 0).sum(-1, keepdim=True).to(counts.dtype)
    types = torch.where(total > 0, types, 1.0)  # an empty row gives (0 + 1 * lower) / (0 + 1) = lower exactly
    return (counts + types * lower) / (total + types)


def tilt_hints(config: TiltConfig, followers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hint [n], has_hint [n]): the top follower of the longest context up to config.order whose row passes
    the gates (at least min_count counts, the top follower's share at least threshold)."""
    hint = has_hint = None
    for k in range(2, config.order + 1):  # longer contexts overwrite shorter ones
        top, top_count, total = followers[k]
        passes = (total >= config.min_count) & (top_count >= config.threshold * total)
        if hint is None:
            hint, has_hint = torch.where(passes, top, 0), passes
        else:
            hint, has_hint = torch.where(passes, top, hint), has_hint | passes
    return hint, has_hint


def tilt_boost(config: TiltConfig, hint_logprob: torch.Tensor, has_hint: torch.Tensor) -> torch.Tensor:
    """b [n] per target: boost * (1 - q_hint)^gamma where a hint passed the gates, else 0."""
    boost = torch.full_like(hint_logprob, config.boost)
    if config.gamma:
        boost = boost * (-torch.expm1(hint_logprob)).clamp_min(0.0) ** config.gamma
    return torch.where(has_hint, boost, 0.0)


def tilt_log_normalizer(boost: torch.Tensor, hint_logprob: torch.Tensor) -> torch.Tensor:
    """log Z = log(1 + q_hint * (exp(b) - 1)) [n]: the log mass of the tilted distribution."""
    return torch.log1p(hint_logprob.exp() * torch.expm1(boost))


def tilt_gold_nll(config: TiltConfig, model_logprobs: torch.Tensor, gold: torch.Tensor, followers: dict):
    """-log p'(gold) [n] of the tilted distribution, O(1) per target."""
    hint, has_hint = tilt_hints(config, followers)
    hint_logprob = model_logprobs.gather(1, hint[:, None])[:, 0]
    boost = tilt_boost(config, hint_logprob, has_hint)
    gold_logprob = model_logprobs.gather(1, gold[:, None])[:, 0]
    return -(gold_logprob + boost * (gold == hint)) + tilt_log_normalizer(boost, hint_logprob)


def tilt_logprobs(config: TiltConfig, model_logprobs: torch.Tensor, followers: dict) -> torch.Tensor:
    """log p' [n, V]: the whole tilted distribution (what the compliance check inspects)."""
    hint, has_hint = tilt_hints(config, followers)
    hint_logprob = model_logprobs.gather(1, hint[:, None])[:, 0]
    boost = tilt_boost(config, hint_logprob, has_hint)
    tilted = model_logprobs - tilt_log_normalizer(boost, hint_logprob)[:, None]
    return tilted.scatter_add(1, hint[:, None], boost[:, None])
