"""Serval transports: TCP streams, datagrams, congestion control."""
