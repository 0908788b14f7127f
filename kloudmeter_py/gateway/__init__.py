"""The HTTP gateway: stateless, reads KV, publishes events."""

from kloudmeter_py.gateway.app import create_app

__all__ = ["create_app"]
