"""GET a URL of a Serval service with httpx: ``http://NAME.serval/PATH`` names the service.

Usage (pyserval installed with the [http] extra)::

    python examples/http_client.py --router 127.0.0.1:54326 http://web.serval/ [URL ...]

The client's host sends unresolved SYNs to the service router at ``--router``, which picks an
instance of the service; ``--route NAME=IP:PORT`` gives a static route instead. Each response
is printed as ``STATUS BODY``; the exit status is 1 if a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

import pyserval
from pyserval.http import AsyncServalTransport


async def fetch(urls: list[str], router: str | None, routes: dict[str, str]) -> int:
    host = pyserval.Host(["127.0.0.1:0"], router=router, routes=routes)
    async with host:
        transport = AsyncServalTransport(host, max_keepalive_connections=0, retries=2)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            failed = 0
            for url in urls:
                try:
                    r = await client.get(url)
                    print(r.status_code, r.text)
                except httpx.HTTPError as exc:
                    print(f"{url}: {exc}", file=sys.stderr)
                    failed += 1
            return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("urls", nargs="+", help="http://NAME.serval/PATH")
    parser.add_argument("--router", help="service router (IP:PORT)")
    parser.add_argument("--route", action="append", default=[], help="static NAME=IP:PORT")
    args = parser.parse_args()
    routes = dict(r.split("=", 1) for r in args.route)
    return asyncio.run(fetch(args.urls, args.router, routes))


if __name__ == "__main__":
    sys.exit(main())
