"""The one exception type for user mistakes; the CLI prints its message without a traceback."""


class QwenkitError(Exception):
    """A problem with the user's input (path, file, setting, prompt) described in one line."""
