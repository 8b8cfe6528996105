"""The client role (``tunnel-client``): connect out to a relay and forward its streams locally."""
