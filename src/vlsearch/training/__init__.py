"""Training loops (separate from the library, as open_clip_train is from open_clip)."""
