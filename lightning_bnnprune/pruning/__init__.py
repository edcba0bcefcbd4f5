"""Filter pruning: channel groups, per-filter gates, schedules and budgets, and the physical removal."""
from . import criteria
from .budget import allocate
from .export import export_packed, load_packed
from .gates import FilterGate, attach_gates, detach_gates, gates_of
from .groups import ChannelGroup, GroupAnalysis, Member, find_channel_groups
from .rebuild import rebuild, replay
from .record import PruningRecord, load_pruned, restore_pruned, save_pruned
from .report import CompressionReport, compression_report
from .schedule import LayerwiseSchedule, Phase
from .surgery import remove_filters, resolve_keep

__all__ = [
    "ChannelGroup", "CompressionReport", "FilterGate", "GroupAnalysis", "LayerwiseSchedule", "Member",
    "Phase", "PruningRecord", "allocate", "attach_gates", "compression_report", "criteria",
    "detach_gates", "export_packed", "find_channel_groups", "gates_of", "load_packed", "load_pruned",
    "rebuild", "remove_filters", "replay", "resolve_keep", "restore_pruned", "save_pruned",
]
