"""Frontends turn user models into IR Graphs."""
