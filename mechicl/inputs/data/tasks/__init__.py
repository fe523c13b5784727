"""Compact real task data for in-context learning; see PROVENANCE.md here."""
