"""Data: sources, audio decoding, the code cache, batching."""
