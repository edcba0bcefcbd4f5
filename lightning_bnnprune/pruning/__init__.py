"""Filter pruning: channel groups, per-filter gates, and the physical removal they lead to."""
from .gates import FilterGate, attach_gates, detach_gates, gates_of
from .groups import ChannelGroup, GroupAnalysis, Member, find_channel_groups

__all__ = [
    "ChannelGroup", "FilterGate", "GroupAnalysis", "Member",
    "attach_gates", "detach_gates", "find_channel_groups", "gates_of",
]
