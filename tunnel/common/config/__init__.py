"""Configuration both programs share: strict YAML, checks with key paths, private files."""
