"""The one exception type that entry points turn into exit code 1 with a one-line reason."""


class SimclrError(Exception):
    """A runtime failure the user can act on (missing folder, corrupt checkpoint, ...).

    Entry points catch it, print ``error: <message>`` on stderr and exit 1; anything else is a
    bug and keeps its traceback.
    """
