"""Corpus → tokenised, packed MDS shards; tokenizer training; the synthetic demo corpus and its checker."""
