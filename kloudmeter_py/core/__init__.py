"""The pure core: plain functions over plain values. No asyncio, nats or aiohttp here."""
