"""The one error type of the image builder."""


class ImageBuildError(Exception):
    """Building or reading the guest image failed; the message is one line for the user."""
