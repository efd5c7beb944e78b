"""The two config errors: a slice's FieldError (raised in __post_init__, naming its field) and the
ConfigError the loader reports to the user as `file: field: message` with exit code 2."""

from __future__ import annotations


class FieldError(ValueError):
    """Raised by a config's __post_init__: `field` is the dataclass field, `message` what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class ConfigError(ValueError):
    """A spec problem, reported to the user as `file: field: message` with exit code 2."""

    def __init__(self, file: str, field: str, message: str):
        super().__init__(f"{file}: {field or '<top>'}: {message}")
        self.file, self.field, self.message = file, field, message
