"""Training loops (separate from the library, as open_clip_train is from open_clip)."""

from __future__ import annotations


def apply_overrides(tc, args, extra: dict | None = None, epochs_field: str = "epochs"):
    """A training config with the CLI's --epochs/--minutes (when given and the config has the field)
    and a caller's ``extra`` settings applied; unknown ``extra`` keys are an error, not a silent no-op."""
    if getattr(args, "epochs", None) and hasattr(tc, epochs_field):
        setattr(tc, epochs_field, type(getattr(tc, epochs_field))(args.epochs))
    if getattr(args, "minutes", None) and hasattr(tc, "minutes"):
        tc.minutes = float(args.minutes)
    for key, value in (extra or {}).items():
        if not hasattr(tc, key):
            raise TypeError(f"{type(tc).__name__} has no setting {key!r}")
        setattr(tc, key, value)
    return tc
