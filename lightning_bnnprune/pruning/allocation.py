"""The allocation of a pruning target: one global PFR shared out over layers as counts of filters.

The user asks for one global PFR (pruned filters / prunable filters, sec. 5 of
``docs/method.md``). :func:`allocate` turns it into a number of filters to prune per group: the pruned
ratio of group ``l`` is ``r_l = min(c * w_l, cap_l)``, with ``c`` found by water-filling so that
the counts add up to the global target, ``cap_l = 1 - min_filters / n_l`` (never prune a layer to
zero) and the weight ``w_l``:

- ``"uniform"``: ``w_l = 1``, every layer loses the same share of its filters;
- ``"size"``: ``w_l ∝ n_l``, wide layers (usually the most redundant) give more;
- ``"macs"``: ``w_l ∝`` the multiply-accumulates one channel of the group costs (its producers'
  output and its consumers' input, :func:`macs_per_channel`), so the budget goes where it saves
  the most compute.

Counts are rounded by largest remainder, so the global count is met exactly whenever the floors
allow it. :data:`GLOBAL` instead ranks every channel of the network by a criterion's scores and
counts what falls below the cut in each group (:func:`global_counts`).

**Engine-friendly counts** (``round_to``, :func:`round_counts`): an inference engine computes
channels in blocks (Larq Compute Engine packs input channels in 32-bit words and produces output
channels in blocks of 8), so a layer pruned from 64 to 38 filters runs as fast as one of 64 on
the input side. With ``round_to=k`` every group keeps a multiple of ``k`` filters (or all of
them), and the counts are moved, one allowed step at a time, to bring the global PFR back to the
target; it must end within :data:`ROUND_TOLERANCE` of it. ``round_to`` may also name an engine
(:data:`ENGINES`): ``"lce"`` keeps multiples of LCE's 32-bit word where a group is wider than a
word, else multiples of 8 (LCE's output-channel block on ARM64, twice x86's), the next best
quantum measured (:func:`engine_steps`); ``"onednn"`` keeps multiples of 16 (oneDNN's AVX-512
channel block), else 8 (AVX2's).

**A latency budget** (:func:`allocate_latency`): instead of a PFR, a target time; one step of one
group at a time is removed, the one that loses the least importance per millisecond saved
(HALP, Shen et al., NeurIPS 2022, eq. 5, for float networks on TensorRT), until the estimate meets
the budget.

Which filters of a group go is not decided here: a criterion's scores or the learned gates rank
them (:meth:`~.groups.ChannelGroup.keep_top`); the term that drives the learned gates to their
share is the selector's (:mod:`.selector`).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..introspect import forward_with_hooks
from .groups import ChannelGroup, GroupAnalysis
from .slicing import OUT

__all__ = ["ALLOCATIONS", "ENGINES", "GLOBAL", "ROUND_TOLERANCE", "allocate", "allocate_latency", "engine_steps",
           "global_counts", "macs_per_channel", "round_counts"]

ALLOCATIONS = ("uniform", "size", "macs")
GLOBAL = "global"  # counts from one ranking of every channel by a criterion's scores (global_counts)
ROUND_TOLERANCE = 0.01  # the global PFR after rounding stays within 1 point of the target
#: ``round_to`` by engine name: ``(the quantum the engine turns into time, the next best)``. LCE
#: packs input channels in 32-bit words (core/types.h) and computes output channels in blocks of
#: 4 (x86 indirect BGEMM, kernel_4x2_portable.h) or 8 (ARM64, kernel_8x4x*_aarch64.h): a group
#: narrower than a word saves only on its producers' outputs, in blocks of 8 on both. oneDNN
#: blocks channels by 16 (AVX-512, nChw16c) or 8 (AVX2, nChw8c).
ENGINES: Dict[str, Tuple[int, int]] = {"lce": (32, 8), "onednn": (16, 8)}
RoundTo = Union[int, str]


def engine_steps(sizes: Mapping[str, int], round_to: RoundTo, min_filters: int = 1) -> Tuple[Dict[str, int], List[str]]:
    """Per group, the multiple its kept count keeps, and the groups that cannot keep the engine's
    first quantum. An int ``round_to`` is every group's step (none falls short); an engine name
    gives each group the engine's quantum when the group has a kept count below its size that is
    a multiple of it (and keeps ``min_filters``), else the next best quantum: a 32-wide group
    under ``"lce"`` keeps 8, 16, 24 or 32 (its consumers read one word whatever it keeps).

    Raises:
        ValueError: an int below 1 or an unknown name (one line, the allowed values).
    """
    if isinstance(round_to, str):
        if round_to not in ENGINES:
            raise ValueError(f"round_to must be an int >= 1 or one of {', '.join(map(repr, ENGINES))}; "
                             f"got {round_to!r}")
        first, second = ENGINES[round_to]
        fits = {k: first < n and first >= min_filters for k, n in sizes.items()}
        return {k: first if fits[k] else second for k in sizes}, [k for k in sizes if not fits[k]]
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r} (or an engine: "
                         f"{', '.join(map(repr, ENGINES))})")
    return {k: round_to for k in sizes}, []


def _water_fill(sizes: Dict[str, int], weights: Dict[str, float], caps: Dict[str, int], total: int) -> Dict[str, float]:
    """Real-valued prune counts ``p_l = min(c * w_l * n_l, cap_l)`` with ``sum p_l = total``."""
    rate = {k: weights[k] * sizes[k] for k in sizes}  # p_l per unit of c
    active = {k for k in sizes if caps[k] > 0 and rate[k] > 0}
    fixed: Dict[str, float] = {k: 0.0 for k in sizes if k not in active}
    remaining = float(total)
    while active:
        c = remaining / sum(rate[k] for k in active)
        saturated = {k for k in active if c * rate[k] >= caps[k]}
        if not saturated:
            fixed.update({k: c * rate[k] for k in active})
            break
        for k in saturated:
            fixed[k] = float(caps[k])
            remaining -= caps[k]
        active -= saturated
    return {k: fixed[k] for k in sizes}


def allocate(
    sizes: Mapping[str, int],
    target_pfr: float,
    allocation: str = "uniform",
    min_filters: int = 1,
    total_filters: Optional[int] = None,
    macs_per_channel: Optional[Mapping[str, float]] = None,
    round_to: RoundTo = 1,
    quanta: Optional[Mapping[str, int]] = None,
    scores: Optional[Mapping[str, Tensor]] = None,
    groups: Optional[Mapping[str, ChannelGroup]] = None,
) -> Dict[str, int]:
    """Filters to prune in each group so that the global PFR is ``target_pfr``.

    Args:
        sizes: ``{group name: number of filters}`` of the groups that may be pruned.
        target_pfr: pruned / prunable filters, in ``[0, 1)``.
        allocation: one of :data:`ALLOCATIONS` (see the module docstring), or :data:`GLOBAL`
            with ``scores`` (:func:`global_counts`).
        min_filters: the fewest filters a group keeps; groups this small stay whole.
        total_filters: the PFR's denominator, default ``sum(sizes)`` (more when some prunable
            groups are left out of the schedule: they count, but stay whole).
        macs_per_channel: ``{group: MACs of one of its channels}``, needed for ``"macs"``.
        round_to: every group keeps a multiple of this many filters, or all, or an engine's
            (:data:`ENGINES`, see :func:`round_counts`); 1 leaves the counts as allocated.
        quanta: ``{group: q}`` for groups whose count must be a multiple of ``q`` (a group feeding
            a grouped conv loses the same number in each of its ``q`` cells,
            :attr:`~.groups.ChannelGroup.num_parts`); such a group keeps at least one channel per
            cell. Their counts are multiples, rounded by largest remainder among them; the groups
            with ``q = 1`` make up what is left, so the total stays exact whenever there are enough
            of them.
        scores, groups: :data:`GLOBAL` only: ``{group: channel scores}`` (higher = keep) and
            ``{group: ChannelGroup}`` for the cells of grouped convs, see :func:`global_counts`.

    Returns:
        ``{group name: filters to prune}``, summing to ``round(target_pfr * total_filters)``
        (with ``round_to > 1``: within 1 point of PFR of it).

    Raises:
        ValueError: an unknown allocation, missing MACs, or a target the floors cannot reach
            (the message gives the largest reachable PFR).
    """
    if allocation not in ALLOCATIONS and not (allocation == GLOBAL and scores is not None):
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not 0.0 <= target_pfr < 1.0:
        raise ValueError(f"target_pfr must be in [0, 1), got {target_pfr!r}")
    sizes = dict(sizes)
    total_filters = sum(sizes.values()) if total_filters is None else int(total_filters)
    goal = int(round(target_pfr * total_filters))
    q = {k: max(1, int((quanta or {}).get(k, 1))) for k in sizes}
    caps = {k: max(0, n - min(n, q[k] * max(1, math.ceil(min_filters / q[k])))) for k, n in sizes.items()}
    if goal > sum(caps.values()):
        reachable = sum(caps.values()) / max(total_filters, 1)
        raise ValueError(
            f"target_pfr={target_pfr} needs {goal} of {total_filters} filters pruned, but keeping "
            f"min_filters={min_filters} per layer allows at most {sum(caps.values())} (PFR {reachable:.4f})"
        )
    if allocation == GLOBAL:  # one ranking across groups; rounded by the same rule as the others
        counts = global_counts(scores, goal, min_filters, groups)
        return round_counts(sizes, counts, round_to, min_filters, goal, total_filters, quanta)
    if allocation == "uniform":
        weights = {k: 1.0 for k in sizes}
    elif allocation == "size":
        weights = {k: float(n) for k, n in sizes.items()}
    else:
        if macs_per_channel is None or set(sizes) - set(macs_per_channel):
            raise ValueError("allocation='macs' needs macs_per_channel for every group")
        weights = {k: float(macs_per_channel[k]) for k in sizes}
    real = _water_fill(sizes, weights, caps, goal)
    counts = {k: min(caps[k], q[k] * int(math.floor(v / q[k] + 1e-9))) for k, v in real.items()}
    # Groups with quanta first, by largest remainder in whole quanta, until their own shortfall is
    # made up: so they lose their share together and the others are not left to compensate (their
    # channels can weigh differently in binary filters, e.g. a residual group's several producers).
    grouped = [k for k in sizes if q[k] > 1]
    deficit = sum(real[k] - counts[k] for k in grouped)
    for k in sorted(grouped, key=lambda k: -(real[k] - counts[k]) / q[k]):
        if 2 * deficit >= q[k] and counts[k] + q[k] <= caps[k]:
            counts[k] += q[k]
            deficit -= q[k]
    ones = [k for k in sizes if q[k] == 1]
    # ties to the earlier (shallower) group: deterministic on every rank
    order = sorted(ones, key=lambda k: -(real[k] - counts[k]))
    short = goal - sum(counts.values())
    for k in order:
        if short <= 0:
            break
        if counts[k] < caps[k]:
            counts[k] += 1
            short -= 1
    for k in ones:  # rounding can leave the remainder on saturated groups: spread it anywhere
        while short > 0 and counts[k] < caps[k]:
            counts[k] += 1
            short -= 1
    for k in reversed(order):  # multiples rounded up past the goal: the others give back
        while short < 0 and counts[k] > 0:
            counts[k] -= 1
            short += 1
    for k in sorted((k for k in sizes if q[k] > 1), key=lambda k: -(real[k] - counts[k])):
        if 2 * short >= q[k] and counts[k] + q[k] <= caps[k]:  # no q = 1 group left to fill in
            counts[k] += q[k]
            short -= q[k]
    return round_counts(sizes, counts, round_to, min_filters, goal, total_filters, quanta)


def round_counts(
    sizes: Mapping[str, int],
    counts: Mapping[str, int],
    round_to: RoundTo,
    min_filters: int = 1,
    goal: Optional[int] = None,
    total_filters: Optional[int] = None,
    quanta: Optional[Mapping[str, int]] = None,
) -> Dict[str, int]:
    """Prune counts whose kept filters are multiples of ``round_to`` (or the whole group).

    Each group first keeps the allowed count nearest to what ``counts`` leaves it (ties: the
    larger); then, while one allowed step of one group brings the total pruned closer to
    ``goal`` (default: the sum of ``counts``), the step that brings it closest is taken (ties: the
    earlier group). Allowed kept counts are ``round_to, 2 * round_to, ... <= n`` that keep at least
    ``min_filters``, and ``n`` itself; a group smaller than ``round_to`` stays whole. A group
    with a quantum ``q`` (see :func:`allocate`) keeps multiples of ``lcm(round_to, q)``. An
    engine name (:data:`ENGINES`) gives each group its own step (:func:`engine_steps`).

    Raises:
        ValueError: a ``round_to`` below 1 or unknown, or a result more than :data:`ROUND_TOLERANCE` of PFR
            from the goal (the message gives both).
    """
    steps, _ = engine_steps(sizes, round_to, min_filters)
    if round_to == 1:
        return dict(counts)
    goal = sum(counts.values()) if goal is None else int(goal)
    total_filters = sum(sizes.values()) if total_filters is None else int(total_filters)
    step = {k: math.lcm(steps[k], (quanta or {}).get(k, 1)) for k in sizes}
    allowed = {k: sorted({n} | {m for m in range(step[k], n + 1, step[k]) if m >= min_filters})
               for k, n in sizes.items()}
    kept = {k: min(allowed[k], key=lambda m, want=sizes[k] - counts[k]: (abs(m - want), -m)) for k in sizes}
    while True:
        off = sum(sizes[k] - kept[k] for k in sizes) - goal  # > 0: too many pruned
        best = None
        for k in sizes:
            i = allowed[k].index(kept[k])
            for j in (i - 1, i + 1):
                if 0 <= j < len(allowed[k]):
                    after = abs(off + kept[k] - allowed[k][j])  # keeping more prunes fewer
                    if after < abs(off) and (best is None or after < best[0]):
                        best = (after, k, allowed[k][j])
        if best is None:
            break
        kept[best[1]] = best[2]
    rounded = {k: sizes[k] - kept[k] for k in sizes}
    achieved, target = sum(rounded.values()) / max(total_filters, 1), goal / max(total_filters, 1)
    if abs(achieved - target) > ROUND_TOLERANCE:
        raise ValueError(
            f"round_to={round_to} cannot keep the PFR within {ROUND_TOLERANCE:.0%} of {target:.4f}: the "
            f"nearest reachable is {achieved:.4f} (groups of {sorted(set(sizes.values()))} filters)"
        )
    return rounded


def allocate_latency(
    sizes: Mapping[str, int],
    importance: Mapping[str, Tensor],
    latency: Callable[[Mapping[str, int]], float],
    budget_ms: float,
    steps: Optional[Mapping[str, int]] = None,
    floors: Optional[Mapping[str, int]] = None,
    fixed: Optional[Mapping[str, int]] = None,
) -> Dict[str, int]:
    """Filters to prune per group so that ``latency(kept) <= budget_ms`` at the least importance lost.

    From every group whole, one move at a time: each group's move is to its next allowed kept
    count (a multiple of ``steps[g]`` at or above ``floors[g]``) that saves time, skipping counts
    the engine runs as fast as the current one; it costs the ``importance`` of the channels it
    drops (each group's lowest, scores normalised by the group's mean magnitude as in
    :func:`global_counts`). The move with the least cost per millisecond saved is taken (HALP,
    Shen et al., NeurIPS 2022, a greedy knapsack) until the budget is met.

    Args:
        sizes: ``{group: channels}`` of the groups that may be pruned.
        importance: ``{group: per-channel scores}``, higher = keep (ones: every channel alike).
        latency: ``{group: kept} -> ms`` of the whole network (groups not named: whole).
        budget_ms: the time to reach.
        steps, floors: per group, the multiple kept counts keep (default 1) and the fewest
            channels kept (default 1).
        fixed: ``{group: kept}`` of groups outside ``sizes`` held at that count (an earlier or
            later stage's).

    Returns:
        ``{group: filters to prune}``.

    Raises:
        ValueError: a budget the floors cannot reach (one line, the fastest reachable time).
    """
    steps = {k: int((steps or {}).get(k, 1)) for k in sizes}
    floors = {k: int((floors or {}).get(k, 1)) for k in sizes}
    kept: Dict[str, int] = {**dict(fixed or {}), **dict(sizes)}
    # cost of dropping the j lowest channels of group g: the prefix sums of its sorted scores
    lost = {}
    for k in sizes:
        s = importance[k].detach().float().flatten()
        s = s / s.abs().mean().clamp(min=1e-12)
        lost[k] = torch.cat([torch.zeros(1), torch.sort(s).values.cumsum(0)]).tolist()

    def allowed(k: str) -> List[int]:  # kept counts below the current one, nearest first
        q = steps[k]
        return [m for m in range(q * ((kept[k] - 1) // q), 0, -q) if m >= floors[k]]

    now = latency(kept)
    while now > budget_ms:
        best = None
        for k in sizes:
            for m in allowed(k):
                trial = {**kept, k: m}
                t = latency(trial)
                if t < now - 1e-12:  # the first count that saves time: skip the engine's flat parts
                    cost = (lost[k][sizes[k] - m] - lost[k][sizes[k] - kept[k]]) / (now - t)
                    if best is None or cost < best[0]:
                        best = (cost, k, m, t)
                    break
        if best is None:
            raise ValueError(f"the latency budget {budget_ms:.4g} ms is out of reach: the floors allow "
                             f"{now:.4g} ms at best")
        _, k, m, now = best
        kept[k] = m
    return {k: sizes[k] - kept[k] for k in sizes}


@torch.no_grad()
def macs_per_channel(model: nn.Module, analysis: GroupAnalysis, example_inputs: Tensor) -> Dict[str, float]:
    """Multiply-accumulates that one channel of each group costs, for ``allocation="macs"``.

    A channel of a group is an output filter of each producer (``C_in / groups * kh * kw`` MACs
    per output pixel) and an input channel of each consumer (``C_out / groups * kh * kw`` per
    output pixel of a conv, ``out_features`` for a linear layer); output sizes come from one forward of
    ``example_inputs``.
    """
    pixels: Dict[str, int] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    forward_with_hooks(model, convs, lambda name, args, out: pixels.__setitem__(name, out[0, 0].numel()),
                       example_inputs)
    costs: Dict[str, float] = {}
    for group in analysis.groups:
        cost = 0.0
        for member in group.members:
            module = model.get_submodule(member.module)
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                per_channel = (module.in_channels if member.role == OUT else module.out_channels) // module.groups
                cost += per_channel * kernel * pixels.get(member.module, 1)
            elif isinstance(module, nn.Linear):
                cost += module.in_features if member.role == OUT else module.out_features
        costs[group.name] = cost
    return costs


def global_counts(scores: Dict[str, Tensor], total: int, min_filters: int,
                  groups: Optional[Dict[str, ChannelGroup]] = None) -> Dict[str, int]:
    """Filters to close per group from one ranking across groups.

    Scores are normalised per group by their mean magnitude (Torch-Pruning's ``"mean"`` group
    normaliser), so criteria on different scales per layer compare; then the ``total`` lowest
    channels network-wide are closed, each group keeping at least ``min_filters``. A group that
    feeds a grouped conv (``groups[name].num_parts = p > 1``) closes ``p`` channels at a time, the
    next-lowest of every cell, ranked by their mean score.
    """
    groups = groups or {}
    parts = {g: groups[g].num_parts if g in groups else 1 for g in scores}
    caps = {g: groups[g].capacity(min_filters) if g in groups else max(0, s.numel() - min_filters)
            for g, s in scores.items()}
    if total > sum(caps.values()):
        raise ValueError(f"cannot close {total} filters: min_filters={min_filters} leaves {sum(caps.values())}")
    entries = []
    for order, (g, s) in enumerate(scores.items()):
        norm = s / s.abs().mean().clamp(min=1e-12)
        if parts[g] > 1:  # unit k: the k-th lowest channel of every cell
            cells = torch.tensor(groups[g].parts)
            norm = torch.stack([norm[cells == c].sort().values for c in range(parts[g])]).mean(0)
        entries.extend((float(v), order, i, g) for i, v in enumerate(norm))
    counts = {g: 0 for g in scores}
    taken = 0
    for _, _, _, g in sorted(entries):
        if taken == total:
            break
        if counts[g] + parts[g] <= caps[g] and taken + parts[g] <= total:
            counts[g] += parts[g]
            taken += parts[g]
    return counts
