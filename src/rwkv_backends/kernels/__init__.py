"""Triton kernels (wkv7.py) and their launchers (launch.py)."""
