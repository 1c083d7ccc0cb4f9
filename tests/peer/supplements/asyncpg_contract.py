"""asyncpg behaviours its own suite does not assert, in its own test style; copied into its tests/ by the peer run.

Each test holds unwrapped (it is asyncpg's documented behaviour); the peer run checks it still holds wrapped.
"""

import asyncio

import asyncpg
from asyncpg import _testbase as tb


class TestPeerContract(tb.ConnectedTestCase):  # type: ignore[misc]  # asyncpg ships no type information
    async def test_is_closing_while_close_waits_for_a_borrowed_connection(self):
        """pool.is_closing() is True from the moment close() starts, while it waits for a release."""
        pool = await self.create_pool(database="postgres", min_size=1, max_size=1)
        con = await pool.acquire()
        closing = asyncio.ensure_future(pool.close())
        await asyncio.sleep(0)  # one turn of the loop: close() has started and waits for the release
        self.assertFalse(closing.done())
        self.assertTrue(pool.is_closing())
        await pool.release(con)
        await closing
        self.assertTrue(pool.is_closing())

    async def test_close_of_a_never_initialised_pool_raises(self):
        """close() on a pool that was never awaited raises InterfaceError('pool is not initialized')."""
        # Not self.create_pool(): the test case's tearDown would terminate() it, which raises the same.
        spec = self.get_connection_spec({"database": "postgres"})
        pool = tb.create_pool(loop=self.loop, min_size=1, max_size=1, **spec)
        with self.assertRaisesRegex(asyncpg.InterfaceError, "not initialized"):
            await pool.close()

    async def test_acquire_after_close_raises_interface_error(self):
        """acquire() on a closed pool raises asyncpg.InterfaceError, which existing handlers catch."""
        pool = await self.create_pool(database="postgres", min_size=1, max_size=1)
        await pool.close()
        with self.assertRaises(asyncpg.InterfaceError):
            await pool.acquire()
