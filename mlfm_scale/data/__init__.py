"""Streaming datasets over prepared shards, their manifest and its compatibility checks."""
