"""Engines: one file each behind the small interface in base.py. Only runner processes import them."""
