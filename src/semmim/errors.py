"""Errors shared by the config, the registries and the parts (a leaf module: imports nothing of semmim)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""
