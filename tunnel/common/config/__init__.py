"""Configuration both programs share: strict YAML, checks with key paths, keys, private files."""
