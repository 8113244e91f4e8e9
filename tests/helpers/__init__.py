"""Helpers of the multi-process tests: process management and a scriptable Serval peer."""
