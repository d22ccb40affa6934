"""Core: what every capability builds on. Devices and dtypes, file writes, models and their hook
points, text to token batches, and activation sources (harvest, cache, stream)."""
