"""tunnel: expose services behind NAT through a relay, over one multiplexed WebSocket."""

__version__ = "0.1.0"
