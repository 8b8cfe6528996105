"""The installed package: the wheel's contents, and a smoke test run from a fresh venv."""
