"""Indexing steps (sources, hashing, diff, chunking, embedding, apply) and the in-process runner."""
