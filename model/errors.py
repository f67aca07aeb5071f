"""Typed errors raised by `model/`; the server maps each to an HTTP status in one place."""


class SpeechChatModelError(Exception):
    """Base class: every error here is the caller's to handle, never a crash."""


class AudioDecodeError(SpeechChatModelError):
    """Audio bytes could not be decoded (corrupt, empty, unsupported format, non-finite samples)."""


class UnsupportedAudioFormatError(AudioDecodeError):
    """The declared audio format is not one of wav, flac, ogg, mp3, pcm16."""


class AudioTooLongError(SpeechChatModelError):
    """Decoded audio is longer than the configured limit."""


class MessageFormatError(SpeechChatModelError):
    """A chat message does not follow the OpenAI message format."""


class LLMLoadError(SpeechChatModelError):
    """The LLM spec names no loadable chat model (missing path, unloadable, no chat template)."""


class CheckpointMismatchError(SpeechChatModelError):
    """An encoder checkpoint was aligned to a different LLM than the one it is loaded against."""


class CheckpointFormatError(SpeechChatModelError):
    """An encoder checkpoint directory is missing files or holds an unknown format."""
