"""Project-independent helpers: config schema, data, pure math, I/O. Imports nothing of the project."""
