"""Small shared helpers (atomic file IO, paths, seeding)."""
