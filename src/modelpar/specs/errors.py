"""The one error type for bad user input: a one-line message that names the value and the fix."""


class SpecError(ValueError):
    """Invalid model, cluster or plan: the command line prints the message and exits with 2."""
