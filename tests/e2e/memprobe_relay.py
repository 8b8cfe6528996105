"""The memory probe in place of the relay (see ``tests.e2e.memprobe``): its own module, so
the relay and the client can both be probed in one run without one ``MEMPROBE_MODULE``
naming the wrong program for the other."""

from __future__ import annotations

from tests.e2e.memprobe import main

if __name__ == "__main__":
    main("tunnel.server.cli", role="relay")
