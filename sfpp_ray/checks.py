"""What a run is given, checked before anything is built: weights files by their headers and the prompts file by
its text, read without torch, so that a bad one fails in one line naming its path before Ray or a model starts.
Also the error a non-finite value stops a run with."""

from __future__ import annotations


class NonFiniteError(RuntimeError):
    """A loss, gradient or latent that is NaN or infinite where going on would hide it (a skipped step too many,
    a video of garbage); the message names where it was."""
