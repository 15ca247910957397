"""Retrieval metrics and the evaluation driver."""
