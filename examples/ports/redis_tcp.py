"""redis-py (``redis.asyncio``) on plain TCP: SET and GET of 10,000 keys, a pipeline, pub/sub.

The plain-TCP twin of ``redis_serval.py``: ``diff redis_tcp.py redis_serval.py`` is the
whole port. Prints one JSON line with what the program saw.

Usage: ``python examples/ports/redis_tcp.py [HOST [PORT [KEYS]]]``
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio as redis


async def main(host: str, port: int, keys: int) -> dict[str, object]:
    client = redis.Redis(host=host, port=port, max_connections=16)
    limit = asyncio.Semaphore(16)

    async def set_get(i: int) -> bool:
        async with limit:
            await client.set(f"key:{i}", f"value:{i}")
            return await client.get(f"key:{i}") == f"value:{i}".encode()

    right = sum(await asyncio.gather(*(set_get(i) for i in range(keys))))
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete("counter", "list").incr("counter").incrby("counter", 41)
        pipe.rpush("list", "a", "b", "c").lrange("list", 0, -1)
        piped = await pipe.execute()
    pubsub = client.pubsub()
    await pubsub.subscribe("news")
    for n in range(3):
        await client.publish("news", f"item {n}")
    heard = []
    while len(heard) < 3:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        if message is not None:
            heard.append(message["data"].decode())
    await pubsub.aclose()
    await client.aclose()
    return {"keys": keys, "right": right, "pipeline": [str(x) for x in piped], "heard": heard}


if __name__ == "__main__":
    args = sys.argv[1:]
    host = args[0] if args else "127.0.0.1"
    port = int(args[1]) if len(args) > 1 else 6379
    keys = int(args[2]) if len(args) > 2 else 10_000
    print(json.dumps(asyncio.run(main(host, port, keys))))
