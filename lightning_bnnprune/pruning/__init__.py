"""Filter pruning: channel groups, per-filter gates, schedules and budgets, and the physical removal.

Modules, by part of the design. The graph analysis imports nothing else of ``pruning/`` (of the
package, only ``introspect`` and ``layers``); no module here imports the callbacks
(:mod:`lightning_bnnprune.callbacks`), which drive them all.

Graph analysis
    - ``slicing``: cutting a layer's channels in place, the one operation every removal is made of
    - ``block_sizes``: channel counts timm blocks keep in attributes, re-derived after a cut
    - ``traceable``: trace-time forms of timm's radix attention, with channel maps we know
    - ``tracing``: where a conv's output channels flow, Torch-Pruning's graph with our index maps
    - ``groups``: channel groups kept or removed together, their cells and refusal reasons

Gates and selection
    - ``gates``: per-filter gates, the subsidiary component of Main/Subsidiary
    - ``gated_norm``: layer norms over the channels that normalise over the open ones while gated
    - ``channel_mixers``: layers mixing across channels (ECA) run on the open channels while gated
    - ``criteria``: importance criteria for the greedy rules, by name
    - ``distill``: the selector's teacher and the retrain's distillation
    - ``selector``: the selector phase's loss (distillation, budget term), start logits, end masks
    - ``schedule``: the warm-up / selector / retrain / final phases, in stages of layers

Allocation
    - ``allocation``: a global target PFR shared out over layers as counts of filters

Removal and record
    - ``rebuild``: a fresh network binarised and cut as a record says (the replay)
    - ``record``: the record of a removal and the pruned-model files
    - ``surgery``: the physical removal of closed filters, checked for exactness

Export
    - ``export``: the packed binary file, 8 weights per byte
    - ``export_lce``: Larq Compute Engine's ``.tflite``
    - ``lce_runtime``: LCE's interpreter (its kernel paths, predictions, latency), in a numpy<2 Python

Report
    - ``report``: filters, parameters, MACs and stored bits of a removal
"""
from . import criteria
from .allocation import allocate
from .export import export_packed, load_packed
from .gates import FilterGate, attach_gates, detach_gates, gates_of
from .groups import ChannelGroup, GroupAnalysis, Member, find_channel_groups
from .rebuild import rebuild, replay
from .record import PruningRecord, load_pruned, restore_pruned, save_pruned
from .report import CompressionReport, compression_report
from .schedule import Phase, StagewiseSchedule
from .surgery import remove_filters, resolve_keep

__all__ = [
    "ChannelGroup", "CompressionReport", "FilterGate", "GroupAnalysis", "Member",
    "Phase", "PruningRecord", "StagewiseSchedule", "allocate", "attach_gates", "compression_report", "criteria",
    "detach_gates", "export_packed", "find_channel_groups", "gates_of", "load_packed", "load_pruned",
    "rebuild", "remove_filters", "replay", "resolve_keep", "restore_pruned", "save_pruned",
]


def __getattr__(name: str):
    if name == "LayerwiseSchedule":  # deprecated alias of StagewiseSchedule until 0.3.0 (warns there)
        from . import schedule

        return schedule.LayerwiseSchedule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
