"""User-facing errors: each prints as one line (no traceback unless ``--debug``)."""


class NemoforgeError(Exception):
    """A problem the user can fix; its message names the input and the fix."""


class RecipeError(NemoforgeError):
    """The recipe is invalid: unknown key, wrong type, impossible budget."""


class InputNotFoundError(NemoforgeError):
    """A model file, corpus or artifact URI does not exist."""


class StorageError(NemoforgeError):
    """The artifact store cannot be reached or refused a request."""
