"""Benchmark functions: copied as package ``functions/`` into a temp dir that every server under test uses."""
