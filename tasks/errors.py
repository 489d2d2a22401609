"""The errors a user can cause and fix; the CLI prints each as one line, without a traceback."""


class AgelensError(ValueError):
    """An expected failure; the message names the input or option and the problem."""


class DataError(AgelensError):
    """Input data, weights or a layer that cannot be used."""


class ConfigError(AgelensError):
    """A setting that cannot work; the message names the option."""
