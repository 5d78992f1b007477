"""The light way in: Governor's API over the daemon's socket, without the engine.

``Client`` blocks, ``AsyncClient`` awaits; both fail with ``DaemonUnavailable`` when no
daemon answers. Neither imports loky, psutil, cloudpickle or the engine, and the asyncio
client (with asyncio itself) is imported only when first asked for.
"""

from governor.client.conversation import DaemonUnavailable
from governor.client.sync_client import Client, RemoteFuture

__all__ = ["AsyncClient", "Client", "DaemonUnavailable", "RemoteFuture"]


def __getattr__(name: str):
    if name == "AsyncClient":
        from governor.client.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'governor.client' has no attribute {name!r}")
