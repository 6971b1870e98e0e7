"""ACL mode: temporary access rules on the hub's guest collection.

:class:`AccessManager` plans, creates and revokes rules and keeps the ledger in
the store; :class:`Reconciler` polls the tasks that hold rules and revokes each
rule when the last task using it ends.
"""

from .manager import AccessManager, Hold
from .reconciler import Reconciler

__all__ = ["AccessManager", "Hold", "Reconciler"]
