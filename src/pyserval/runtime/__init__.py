"""The asyncio runtime: UDP encapsulation endpoints, the host, sockets and streams."""
