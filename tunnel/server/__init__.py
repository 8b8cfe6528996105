"""The relay role (``tunnel-server``): public ports, client links, leases and the dashboard."""
