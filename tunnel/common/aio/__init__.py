"""The asyncio adapters: the link over a WebSocket, its framing and TLS, budgets, runtime."""
