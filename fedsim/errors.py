"""Errors a user can fix by changing their input.

Every one of them reaches the terminal as one line (`file: key: message`) with exit code 2 and no
traceback; anything else is a bug in fedsim or a plugin and keeps its traceback.
"""

from __future__ import annotations


class FedsimError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key

    def located(self, *, file: str | None = None, key: str | None = None) -> "FedsimError":
        """Fill in where the error came from, keeping what is already known."""
        self.file = self.file or file
        self.key = self.key or key
        return self

    def __str__(self) -> str:
        """One line, always: newlines that came in with user input are shown escaped."""
        where = [part for part in (self.file, self.key) if part]
        return ": ".join([*where, self.message]).replace("\r", "\\r").replace("\n", "\\n")


class ScenarioError(FedsimError):
    """A scenario file or override that is malformed or out of range."""


class UnknownNameError(FedsimError):
    """A name (algorithm, aggregator, data set, ...) that no registry knows."""


class DataError(FedsimError):
    """A data file that is missing or malformed."""


class TopologyError(FedsimError):
    """A graph that cannot be built or does not have the property a method needs."""


class PluginError(FedsimError):
    """A plug-in (rule, trainer, flow) raised or returned the wrong thing during a run: a bug to
    report, not bad input. The run stops with its rows kept (exit code 1)."""

    exit_code = 1


class ClientError(PluginError):
    """A trainer raised while working for a client; the scenario may treat it as a failure instead
    (`on_client_error = "drop"`)."""


class DivergenceError(FedsimError):
    """The model went non-finite or its loss exploded (exit code 3)."""

    exit_code = 3


class StalledError(FedsimError):
    """The simulated clock stopped advancing: nothing can happen any more (exit code 4). The run's
    rows and summary.json (`stalled`) are kept."""

    exit_code = 4
