"""Everything that talks to Globus: token checks, dependent tokens, submission.

Every globus-sdk call is synchronous; the classes here run them in a bounded
thread pool so the event loop keeps serving other users while Globus answers.
"""

from ..model import GlobusUser
from .collection import CollectionACL
from .submitter import TransferSubmitter, UserCredential

__all__ = ["CollectionACL", "GlobusUser", "TransferSubmitter", "UserCredential"]
