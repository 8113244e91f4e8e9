"""aiomcache on plain TCP: set and get, and a multi-get, against memcached.

The plain-TCP twin of ``aiomcache_serval.py``: ``diff aiomcache_tcp.py aiomcache_serval.py``
is the whole port. Prints one JSON line with what the program saw.

Usage: ``python examples/ports/aiomcache_tcp.py [HOST [PORT [KEYS]]]``
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiomcache


async def main(host: str, port: int, keys: int) -> dict[str, object]:
    client = aiomcache.Client(host, port, pool_size=4)
    right = 0
    for i in range(keys):
        async with asyncio.timeout(10):  # a server that went away silently: give up
            await client.set(b"key:%d" % i, b"value:%d" % i)
            right += await client.get(b"key:%d" % i) == b"value:%d" % i
    wanted = [b"key:%d" % i for i in range(0, keys, max(1, keys // 50))] + [b"missing"]
    values = await client.multi_get(*wanted)
    await client.close()
    return {
        "keys": keys,
        "right": right,
        "multi_get": [v.decode() if v is not None else None for v in values],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    host = args[0] if args else "127.0.0.1"
    port = int(args[1]) if len(args) > 1 else 11211
    keys = int(args[2]) if len(args) > 2 else 1000
    print(json.dumps(asyncio.run(main(host, port, keys))))
