"""Bundled device descriptions (TOML), loaded by :mod:`edgeq.target`."""
