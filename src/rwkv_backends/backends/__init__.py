"""Implementations registered with the dispatcher: one module per backend."""
