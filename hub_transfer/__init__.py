"""hub-transfer: a JupyterHub-managed service that submits Globus transfers.

The Globus JupyterLab extension posts its transfer document here with the
single-user server's hub token; the service checks both the hub identity and the
user's Globus token, trades that token for a Transfer token, and submits the
transfer as the user.
"""

from ._version import __version__

__all__ = ["__version__"]
