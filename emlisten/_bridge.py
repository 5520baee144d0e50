"""The one asyncio event loop of the process, running inside Trio (trio-asyncio).

aio-pika and aiosmtplib are asyncio libraries. They are created and called only in adapter
modules, through :func:`run_asyncio`; nothing else imports asyncio. Leaving the loop cancels
their hidden tasks, so they stay inside the structured task tree. (Redis is not on the bridge:
the store speaks RESP over Trio sockets, emlisten.store._resp; a call through the bridge cost
258-280 us of CPU.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio_asyncio

T = TypeVar("T")


@asynccontextmanager
async def open_asyncio_bridge() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield


async def run_asyncio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await an asyncio coroutine function from Trio (inside :func:`open_asyncio_bridge`)."""

    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result
