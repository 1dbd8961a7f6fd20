"""User-facing errors: each names the problem and the fix, and the CLI prints them without a traceback."""


class DiffcoderError(Exception):
    """An error caused by user input (a path, a config value, a request) rather than a bug."""


class CheckpointError(DiffcoderError):
    """A checkpoint is missing, corrupt or of an unsupported kind."""


class DecodingError(DiffcoderError):
    """Decoding parameters that cannot work (e.g. steps that do not divide over the blocks)."""


class ConfigError(DiffcoderError):
    """A configuration key or value is invalid."""


class TargetExistsError(DiffcoderError):
    """An output path holds data this command did not create (the user must choose another path or --force)."""
