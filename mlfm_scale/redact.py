"""Secrets out of what we record: the config copies in wandb, checkpoints, job folders and dry-run output.

A value is secret when its key (a mapping key, or the NAME of a ``NAME=VALUE`` / ``export NAME=VALUE`` string such
as a ``launch.setup`` line) contains ``key``, ``token``, ``secret`` or ``password`` (any case), unless the key is
one of the config's own non-secret names (``eos_token``: a vocabulary entry; ``tokenizer``: a directory).
Credentials belong in the environment (``WANDB_API_KEY``), where nothing here records them.
"""
from __future__ import annotations

import re

REDACTED = "<redacted>"
SECRET = re.compile(r"key|token|secret|password|passwd", re.IGNORECASE)
NOT_SECRET = frozenset({"eos_token", "tokenizer"})  # config keys that match SECRET but name no credential
ASSIGNMENT = re.compile(r"(?P<head>(?:\bexport\s+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)(?P<value>'[^']*'|\"[^\"]*\"|\S+)")


def is_secret(key: str) -> bool:
    return key not in NOT_SECRET and SECRET.search(key) is not None


def redact_text(text: str) -> str:
    """``text`` with the value of every ``NAME=VALUE`` whose NAME looks secret replaced."""
    return ASSIGNMENT.sub(lambda m: m["head"] + REDACTED if is_secret(m["name"]) else m[0], text)


def redact(value):
    """A copy of ``value`` (nested dicts, lists, strings) with secret-looking entries replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret(k) and v is not None else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
