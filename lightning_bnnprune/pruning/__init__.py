"""Filter pruning: channel groups, per-filter gates, schedules and budgets, and the physical removal."""
from . import criteria
from .budget import allocate
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
