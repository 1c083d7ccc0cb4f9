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
from poolkeeper._run import run
from poolkeeper._signals import SignalHandlers, install_signal_handlers
from poolkeeper._wrap import wrap
from poolkeeper.adapters import register_adapter
from poolkeeper.errors import PoolClosedError, PoolkeeperError, RegistrationError, UnsupportedResourceError
from poolkeeper.hooks import BackgroundTasks, flush_logging, stop_tasks

__all__ = [
    "BackgroundTasks",
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
    "SignalHandlers",
    "UnsupportedResourceError",
    "flush_logging",
    "get_registry",
    "install_signal_handlers",
    "register_adapter",
    "run",
    "stop_tasks",
    "wrap",
]

__version__ = "0.1.0"
