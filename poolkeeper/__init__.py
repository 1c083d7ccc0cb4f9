"""poolkeeper: shut connection pools down the way production needs.

Wrap the pools you already use; on shutdown poolkeeper refuses new checkouts, waits for the
borrowed connections to come back, force-closes the rest at a deadline (on the client and on
the server), in dependency order, and reports what happened.

Importing this package imports only the standard library.
"""

from __future__ import annotations

from poolkeeper._borrowers import Borrower, Frame
from poolkeeper._hooks import Hook
from poolkeeper._keeper import Keeper, KeeperState
from poolkeeper._registry import Registry, get_registry
from poolkeeper._report import ResourceReport, ShutdownReport
from poolkeeper._wrap import wrap
from poolkeeper.errors import PoolClosedError, PoolkeeperError, RegistrationError, UnsupportedResourceError

__all__ = [
    "Borrower",
    "Frame",
    "Hook",
    "Keeper",
    "KeeperState",
    "PoolClosedError",
    "PoolkeeperError",
    "RegistrationError",
    "Registry",
    "ResourceReport",
    "ShutdownReport",
    "UnsupportedResourceError",
    "get_registry",
    "wrap",
]

__version__ = "0.1.0"
