"""Contract governance: breaking-change detection and style rules over FileDescriptorProtos."""

from tabadol.governance.compat import Breaking, BreakingKind, breaking_changes
from tabadol.governance.lint import RULES, Finding, lint
from tabadol.governance.load import load_contracts, own_files, proto_files

__all__ = [
    "RULES",
    "Breaking",
    "BreakingKind",
    "Finding",
    "breaking_changes",
    "lint",
    "load_contracts",
    "own_files",
    "proto_files",
]
