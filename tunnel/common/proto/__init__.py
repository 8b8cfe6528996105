"""The pure protocol core (frames, multiplexer, control messages, auth): no I/O, no clock."""
