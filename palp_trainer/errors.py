"""The trainer's input errors, in a module of their own: the CLI catches them without importing torch (seconds)."""


class DataError(ValueError):
    """Bad input data (a subject image; an adapter folder: export.AdapterError); the message names the file."""
