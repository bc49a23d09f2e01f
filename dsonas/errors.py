"""One error family for everything a user can cause.

Tools catch `DsonasError`, print its one-line message and exit with code 2; anything else is a bug and
keeps its traceback.
"""


class DsonasError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""


class ConfigError(DsonasError):
    """A config file or override has an unknown key, a wrong type or an impossible value."""


class DataError(DsonasError):
    """A dataset is missing, incomplete or malformed."""


class GenotypeError(DsonasError):
    """A genotype file is missing, malformed or inconsistent."""


class BudgetError(DsonasError):
    """A requested cost target cannot be reached."""


class RunFolderError(DsonasError):
    """A run folder exists and would be overwritten, or a resume has nothing to resume."""


class TrainingError(DsonasError):
    """Training diverged (NaN or infinite loss)."""
