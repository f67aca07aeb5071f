"""Typed errors raised by `training/`: each names a bad input or a failed external step."""


class ManifestFormatError(ValueError):
    """A manifest line is not a JSON object with string `id`, `audio` and `text`."""


class CorpusImportError(ValueError):
    """The source folder does not hold the layout its kind expects, or holds no utterances."""


class SynthesisError(RuntimeError):
    """An engine or sox call failed, timed out, or produced no usable audio."""
