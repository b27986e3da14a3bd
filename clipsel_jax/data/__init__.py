"""Data sources, preprocessing, and (later) noise and corruptions."""
