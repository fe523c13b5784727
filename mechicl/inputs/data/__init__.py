"""Data shipped with mechicl."""
