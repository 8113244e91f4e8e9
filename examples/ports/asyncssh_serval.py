"""asyncssh on Serval: an SSH server (a command handler and SFTP in a directory) and a
client that runs a command and copies a file both ways over SFTP.

``diff asyncssh_tcp.py asyncssh_serval.py`` is the whole port: ``pyserval.install()`` on
each side; the server listens on the service ``ssh``, the client connects to ``ssh.serval``.
Hosts come from the environment (``PYSERVAL_ROUTER`` etc.). ``KEYS`` is a directory with
``host_key``, ``host_key.pub``, ``client_key`` and ``client_key.pub`` (OpenSSH format); the
server's SFTP root is ``KEYS/root``.

Usage: ``python examples/ports/asyncssh_serval.py serve KEYS [HOST [PORT]]`` (prints
``serving``), or ``python examples/ports/asyncssh_serval.py KEYS FILE [HOST [PORT]]`` (the
client: puts FILE to the server, gets it back; prints one JSON line).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import asyncssh

import pyserval


def run_command(process: asyncssh.SSHServerProcess[str]) -> None:
    process.stdout.write(f"ran {process.command} as {process.get_extra_info('username')}\n")
    process.exit(0)


async def server(keys: Path, host: str, port: int) -> None:
    pyserval.install()
    (keys / "root").mkdir(exist_ok=True)
    await asyncssh.listen(
        host,
        port,
        server_host_keys=[str(keys / "host_key")],
        authorized_client_keys=str(keys / "client_key.pub"),
        process_factory=run_command,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(keys / "root")),
    )
    print(f"serving ssh on {host}:{port}", flush=True)
    await asyncio.Event().wait()


async def client(keys: Path, file: Path, host: str, port: int) -> dict[str, object]:
    pyserval.install()
    trusted = [asyncssh.read_public_key(str(keys / "host_key.pub"))]
    async with asyncssh.connect(
        host,
        port,
        username="serval",
        client_keys=[str(keys / "client_key")],
        known_hosts=(trusted, [], []),
        keepalive_interval=5,  # a server that went away silently is noticed in 15 s
    ) as conn:
        ran = await conn.run("hello world", check=True)
        async with conn.start_sftp_client() as sftp:
            await sftp.put(str(file), "copy.bin")
            back = file.with_suffix(".back")
            await sftp.get("copy.bin", str(back))
    return {
        "output": ran.stdout,
        "sent_sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "back_sha256": hashlib.sha256(back.read_bytes()).hexdigest(),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "serve":
        host = args[2] if len(args) > 2 else "ssh.serval"
        port = int(args[3]) if len(args) > 3 else 8022
        asyncio.run(server(Path(args[1]), host, port))
    else:
        host = args[2] if len(args) > 2 else "ssh.serval"
        port = int(args[3]) if len(args) > 3 else 8022
        print(json.dumps(asyncio.run(client(Path(args[0]), Path(args[1]), host, port))))
