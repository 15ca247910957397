"""Errors a user can act on. The CLI prints their message without a traceback; the service maps them to 4xx."""


class VLSearchError(Exception):
    """Base class: the message alone must tell the user what to do."""


class DataError(VLSearchError):
    """A dataset or image folder is missing, empty or malformed."""


class MissingSplitError(DataError):
    """The dataset has no such split (e.g. no dev file): trainers then skip dev evaluation, and say so."""


class CheckpointError(VLSearchError):
    """A checkpoint is missing, corrupt, or was made by an incompatible version or config."""


class IndexError_(VLSearchError):
    """An index is missing, corrupt, or was made with another model or version."""


class QueryError(VLSearchError):
    """A query (text, image or k) is not usable."""
