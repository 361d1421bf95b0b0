"""The error model of the stages: every error a user can fix is a `StageError` with a one-line message.

    StageError          base; the CLI prints `error: <message>` and exits 2 for any of these
    StageConfigError    a setting or an input that cannot work (bad column, missing folder, bad model)
    InputNotReady       an upstream stage has not finished yet: `status` and `plan` say "waiting"
    ShardError          a shard or cache on disk that is damaged or does not match its marker

Anything else is a bug and keeps its traceback. Errors of the lower layers (`shards.tables.TableError`,
`captioning.base.CaptionerError`) are turned into these where a stage meets them.
"""

from __future__ import annotations


class StageError(ValueError):
    """Base of every error reported as one line."""


class StageConfigError(StageError):
    """A stage setting or input that cannot work as given; fix the manifest or the input."""


class InputNotReady(StageError):
    """An upstream stage's output is not complete yet; run that stage first."""


class ShardError(StageError):
    """A shard, marker or cache on disk that is damaged or does not match what its marker says."""
