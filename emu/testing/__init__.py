"""Test and launcher scaffolding: seeded whole-world scenarios, run on one rank through the
public API or on the whole world through the reference, and their comparison."""
