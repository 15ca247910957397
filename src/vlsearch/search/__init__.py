"""Search: embedding queries and galleries, retrieving from the index, and re-ranking with a Slow model."""
