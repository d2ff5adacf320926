"""Backends turn IR Graphs into runnable artifacts."""
