"""Errors raised by quant/. Each message names the file, layer or field and says what to do."""

from __future__ import annotations


class QuantFileError(ValueError):
    """A model file cannot be read the way it was asked to be read."""


class CorruptFileError(QuantFileError):
    """The file is truncated or is not a safetensors file."""


class MissingScaleError(QuantFileError):
    """An fp8 weight lacks the scale tensor that its file's layout says must exist."""


class NonFiniteWeightError(QuantFileError):
    """A tensor holds NaN or inf values."""


class UnsupportedQuantFormatError(QuantFileError):
    """A layer is quantized in a format this loader does not read (nvfp4, int8, block scales...)."""


class SavedFormatVersionError(QuantFileError):
    """A LowVRAM Kit fp8 file was written in another format version."""


class SaveError(OSError):
    """Writing a file failed; no partial file was left behind."""
