"""Fitting a plan under a byte target: the counted size of a quantized state, and the search for the fewest
demoted blocks whose artifact fits.

Sizes come from real compression (pgolf.codecs, exactly as `pgolf compress` packs), so a fit never relies on
an estimate; the search sizes several demotion counts at once on threads because one sizing of a
challenge-scale model takes seconds.
"""

from concurrent.futures import ThreadPoolExecutor

from pgolf.codecs import CODECS, blob_candidates
from pgolf.errors import OverBudget
from pgolf.model import BlockLayout
from pgolf.plans import demote_blocks


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
