"""Storage: what the service must remember across restarts.

In ACL mode the service holds the power to open the hub's collection; every rule
it creates is written here *before* Globus is asked for it, so a process killed
at any point leaves a record that the next start uses to clean up.
"""

from .crypto import CryptKeeper, CryptKeyError
from .db import Store
from .models import Credential, Rule, Submission

__all__ = ["CryptKeeper", "CryptKeyError", "Credential", "Rule", "Store", "Submission"]
