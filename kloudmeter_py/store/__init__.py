"""NATS adapters: the only modules (with worker and gateway wiring) that talk to NATS."""
