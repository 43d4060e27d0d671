"""Fitting a plan under a byte target: the counted size of a quantized state, and the searches that make it fit:
the fewest demoted blocks (demote), the smallest sdclip k factor (clip-k), the fewest +-1 levels pruned to 0
(prune).

Sizes come from real compression (pgolf.codecs, exactly as `pgolf compress` packs), so a fit never relies on
an estimate; the search sizes several demotion counts at once on threads because one sizing of a
challenge-scale model takes seconds.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from pgolf.codecs import CODECS, blob_candidates
from pgolf.errors import OverBudget
from pgolf.model import BlockLayout
from pgolf.plans import demote_blocks
from pgolf.schemes import SCALE_SUFFIX, SCHEMES


class ArtifactSizer:
    """Counted bytes of a quantized state: its blob (pgolf.codecs, as `pgolf compress` writes it) + the code
    allowance. The first sizing tries every codec x shuffle x bitpack layout asked for; later ones reuse the
    winner, since a challenge-scale model takes seconds per compression and a fit sizes it several times
    (`pgolf compress --codec auto` tries every layout again, so the shipped blob can only be smaller)."""

    def __init__(self, codec: str, code_bytes: int):
        self.codecs = CODECS if codec == "auto" else (codec,)
        self.code_bytes = code_bytes
        self.layout: dict = {}

    def __call__(self, tensors: dict, plan: dict) -> int:
        best = blob_candidates(tensors, plan, self.codecs, **self.layout)[0]
        self.codecs = (best["codec"],)
        self.layout = {"shuffle": best["shuffle"], "bitpack": best["bitpack"]}
        return best["bytes"] + self.code_bytes

    def every_layout(self, tensors: dict, plan: dict) -> int:
        """Counted bytes in the best shuffle x bitpack layout of the chosen codec, as `pgolf compress` would
        pick it: the winner can change as blocks are demoted (on an H100-trained seed-11l checkpoint, byte
        shuffling lost at no demotion and won by 83 KB with 10 of 11 blocks at int5)."""
        return blob_candidates(tensors, plan, self.codecs)[0]["bytes"] + self.code_bytes


def fit_plan_to_target(schemes: dict, order: list[int], scheme: str, size_of, target: int, layout: BlockLayout,
                       progress=None, workers: int = 1, confirm=None):
    """Demote the first k blocks of `order` to `scheme` for the smallest k with size_of(schemes) <= target.

    Each size_of call compresses the whole model (seconds at challenge scale), so k is found by a search over
    the demotion count (the size falls as blocks are demoted) that sizes up to `workers` counts at once on
    threads: bisection for one worker, about three rounds for eight. size_of(undemoted) runs first and alone
    (ArtifactSizer picks its layout there), later calls must be thread-safe. `confirm` (optional) is a
    thorough sizing, never larger than size_of (ArtifactSizer.every_layout): once the search settles, the
    count below the answer is sized again with it, stepping down while that fits. Returns (schemes, steps):
    every size measured, by demotion count (the smaller of the two sizings), each naming the blocks demoted;
    the last step is the chosen plan. OverBudget (exit 4) with the smallest achievable size when even every
    block demoted does not fit.
    """
    sizes: dict[int, int] = {}

    def size(count: int) -> int:
        return size_of(demote_blocks(schemes, order[:count], scheme, layout))

    def measure(counts: list[int]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(counts)))) as pool:
            for count, measured in zip(counts, pool.map(size, counts), strict=True):
                sizes[count] = measured
                if progress:
                    progress(f"fit: {order[:count]} at {scheme}: {measured:,} bytes (target {target:,})")

    measure([0])
    too_big, fits = 0, len(order)  # sizes[too_big] > target; the answer lies in (too_big, fits]
    while sizes[0] > target:
        counts = [] if fits in sizes else [fits]
        inner = min(max(workers, 1) - len(counts), fits - too_big - 1)
        if inner > 0:
            counts += sorted({too_big + (fits - too_big) * (i + 1) // (inner + 1) for i in range(inner)})
        if not counts:
            break
        measure(counts)
        if sizes[len(order)] > target:
            raise OverBudget(
                f"target {target:,} bytes is out of reach: with every block at {scheme} the artifact is "
                f"{sizes[len(order)]:,} bytes, the smallest this plan can make"
            )
        fits = min(count for count, measured in sizes.items() if measured <= target)
        too_big = max(count for count, measured in sizes.items() if measured > target and count < fits)
    chosen = 0 if sizes[0] <= target else fits
    if sizes.get(chosen, sizes[0]) > target:  # nothing to demote (every tensor stays float), or nothing fits
        smallest = min(sizes.values())
        raise OverBudget(f"target {target:,} bytes is out of reach: the smallest artifact this plan can make is "
                         f"{smallest:,} bytes ({len(order)} demotable blocks)")
    while confirm is not None and chosen > 0:
        count = chosen - 1
        measured = confirm(demote_blocks(schemes, order[:count], scheme, layout))
        sizes[count] = min(sizes.get(count, measured), measured)
        if progress:
            progress(f"fit: {order[:count]} at {scheme}, every layout: {measured:,} bytes (target {target:,})")
        if sizes[count] > target:
            break
        chosen = count
    steps = [{"demoted": order[:count], "bytes": sizes[count]} for count in sorted(sizes) if count <= chosen]
    return demote_blocks(schemes, order[:chosen], scheme, layout), steps


def measure_parallel(size, points: list, workers: int) -> list:
    """size(point) for each point, up to `workers` at once on threads (the codecs release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(points)))) as pool:
        return list(pool.map(size, points))


CLIP_K_CLUSTER = 0.06  # half-width of a round's factors around the interpolated one, a fraction of ln(high / low)
# the same around an extrapolated guess, a fraction of its distance from the last factor over the target in ln k:
# the slope it extrapolates with (the bytes-per-doubling prior, or a secant) is ~10 % off, so the guess is off by
# about that fraction of the distance (an absolute spread, 0.1 in ln k, sized a whole round past an answer 0.003
# away in sp8192-300s' record-int6 fit)
CLIP_K_FIRST_SPREAD = 0.3


def fit_clip_k(size_at, target: int, k_max: float, tolerance: float = 0.01, progress=None, workers: int = 1,
               k_min: float = 1.0, bytes_per_doubling: float | None = None, prepare=None):
    """The smallest sdclip k factor in [k_min, k_max] (to a relative `tolerance`) whose artifact fits: size_at(factor)
    falls as the factor grows (c = k * std: a wider clip means a coarser step, levels nearer zero, fewer compressed
    bytes), so the smallest that fits spends the byte budget on the finest step. k_min = 1 (the records' k) only
    ever widens the clip to fit; k_min < 1 also narrows it to fill a budget the records' k leaves unused.

    One sizing compresses the whole model (a minute with brotli-11 at challenge scale), so the search spends few:
    the size falls about linearly in ln k (doubling the step takes about a bit from every value), so each round
    interpolates ln k between the two measured factors that bracket the target and sizes max(workers, 2) factors
    clustered around that guess at once on threads, until high / low <= 1 + tolerance. size_at(k_min) runs
    first and alone (ArtifactSizer picks its layout there), later calls must be thread-safe. Before any factor
    fits, the next guess extrapolates from k_min with `bytes_per_doubling` (the integer values / 8: a prior for
    the first round, so k_max need not be sized when a guess fits) or, without it, sizes k_max. `prepare(factors)`
    (optional) runs before each round's sizings (PlanQuantizer.prefetch: one GPTQ solve for them all). Returns (factor,
    steps [{"k_scale", "bytes"}] in measuring order, fits); when even k_max does not fit, (k_max, steps, False)."""
    steps, sizes = [], {}

    def measure(factors: list) -> None:
        factors = sorted(set(factors) - set(sizes))
        if prepare is not None and factors:
            prepare(factors)
        for factor, measured in zip(factors, measure_parallel(size_at, factors, workers), strict=True):
            steps.append({"k_scale": factor, "bytes": measured})
            sizes[factor] = measured
            if progress:
                progress(f"fit: sdclip k x {factor:.4f}: {measured:,} bytes (target {target:,})")

    def cluster(center: float, half_width: float, low: float, high: float) -> list[float]:
        """Up to max(workers, 2) unmeasured factors evenly over center +- half_width in ln k, cut to (low, high]
        (a cut edge at low is left out, so the round's factors all land inside)."""
        count = max(workers, 2)
        bottom, top = max(center - half_width, math.log(low)), min(center + half_width, math.log(high))
        if bottom == math.log(low):
            points = [bottom + (top - bottom) * (i + 1) / count for i in range(count)]
        else:
            points = [bottom + (top - bottom) * i / (count - 1) for i in range(count)]
        inside = {round(math.exp(p), 6) for p in points}
        return [f for f in inside if low < f <= high and f not in sizes]

    measure([k_min])
    if sizes[k_min] <= target:
        return k_min, steps, True
    while True:
        low = max(f for f, b in sizes.items() if b > target)  # size(low) > target
        fitting = [f for f, b in sizes.items() if b <= target and f > low]
        if not fitting:
            if k_max in sizes:
                return k_max, steps, False
            below = sorted(sizes)[-2:]
            if len(below) == 2 and sizes[below[0]] > sizes[below[1]]:  # secant through the two largest factors
                per_ln = (sizes[below[0]] - sizes[below[1]]) / math.log(below[1] / below[0])
            elif bytes_per_doubling:
                per_ln = bytes_per_doubling / math.log(2)
            else:
                measure([k_max])
                continue
            distance = (sizes[low] - target) / per_ln
            spread = max(CLIP_K_FIRST_SPREAD * distance, math.log1p(tolerance) / 3)
            measure(cluster(math.log(low) + distance, spread, low, k_max) or [k_max])
            continue
        high = min(fitting)
        width = math.log(high / low)
        guess = math.log(low) + width * (sizes[low] - target) / max(sizes[low] - sizes[high], 1)
        factors = [] if high / low <= 1 + tolerance else cluster(
            guess, max(CLIP_K_CLUSTER * width, math.log1p(tolerance) / 3), low, high)
        if not factors:  # within tolerance (or nothing left to size between two rounded factors)
            return high, steps, True
        measure(factors)


def prune_candidates(tensors: dict, schemes: dict) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every +-1 level of the integer tensors (an LQER tensor's base levels too, never its factors), smallest
    |level * scale| (= its row's scale) first, ties in name then position order: (sorted tensor names, each
    candidate's index into them, each candidate's flat position in its tensor)."""
    names, flats, magnitudes = [], [], []
    for index, name in enumerate(sorted(schemes)):
        if not SCHEMES[schemes[name]].integer:
            continue
        levels = tensors[name].reshape(tensors[name].size(0), -1)
        rows, cols = (levels.abs() == 1).nonzero(as_tuple=True)
        flats.append(rows * levels.size(1) + cols)
        magnitudes.append(tensors[name + SCALE_SUFFIX].float()[rows])
        names.append(torch.full_like(rows, index))
    if not flats:
        return [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    magnitude, which, flat = torch.cat(magnitudes), torch.cat(names), torch.cat(flats)
    order = torch.sort(magnitude, stable=True).indices
    return sorted(schemes), which[order], flat[order]


def prune_levels(tensors: dict, candidates, count: int) -> tuple[dict, dict[str, int]]:
    """A copy of `tensors` with the first `count` candidates (prune_candidates) set to 0, and {name: zeroed}."""
    names, which, flat = candidates
    out, pruned = dict(tensors), {}
    chosen_which, chosen_flat = which[:count], flat[:count]
    for index in torch.unique(chosen_which).tolist():
        name = names[index]
        levels = tensors[name].clone()
        positions = chosen_flat[chosen_which == index]
        levels.view(-1)[positions] = 0
        out[name], pruned[name] = levels, int(positions.numel())
    return out, pruned


def fit_prune(size_pruned, total: int, target: int, progress=None, workers: int = 1,
              known: dict[int, int] | None = None) -> tuple[int, list[dict]]:
    """The smallest count in [0, total] with size_pruned(count) <= target (pruning more +-1 levels to 0 only lowers
    the levels' entropy): a search that sizes up to `workers` counts at once on threads, bisection for one worker.
    `known`: sizes already measured ({0: bytes} from the fit before). Returns (count, steps [{"pruned", "bytes"}],
    the count just below the answer measured and over the target); OverBudget when pruning every candidate does
    not fit."""
    sizes: dict[int, int] = dict(known or {})

    def measure(counts: list[int]) -> None:
        for count, measured in zip(counts, measure_parallel(size_pruned, counts, workers), strict=True):
            sizes[count] = measured
            if progress:
                progress(f"fit: {count:,} of {total:,} +-1 levels pruned: {measured:,} bytes (target {target:,})")

    if 0 not in sizes:
        measure([0])
    chosen = 0
    if sizes[0] > target:
        if total not in sizes:
            measure([total])
        if total == 0 or sizes[total] > target:
            raise OverBudget(f"target {target:,} bytes is out of reach: with all {total:,} +-1 levels pruned the "
                             f"artifact is {sizes[total]:,} bytes")
        low, high = 0, total  # size(low) > target >= size(high)
        while high - low > 1:
            inner = min(max(1, workers), high - low - 1)
            measure(sorted({low + (high - low) * (i + 1) // (inner + 1) for i in range(inner)}))
            high = min(c for c, measured in sizes.items() if low < c <= high and measured <= target)
            low = max(c for c, measured in sizes.items() if low <= c < high and measured > target)
        chosen = high
    return chosen, [{"pruned": count, "bytes": sizes[count]} for count in sorted(sizes)]
