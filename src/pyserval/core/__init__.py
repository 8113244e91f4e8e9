"""The sans-I/O Serval host: what the asyncio runtime and the simulated network drive."""

from .host import DatagramEndpoint, DatagramTooLarge, HostCore, Listener, NoRoute

__all__ = ["DatagramEndpoint", "DatagramTooLarge", "HostCore", "Listener", "NoRoute"]
