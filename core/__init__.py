"""Shared core, the bottom layer: errors, frozen-dataclass configs, hashing, atomic file writes.

Every stage (cache, pipeline, train, analyze, cli) may import it; it imports nothing of musk's.
"""
