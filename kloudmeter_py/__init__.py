"""kloudmeter-py: usage metering and rating on NATS JetStream."""

__version__ = "0.1.0"
