"""One module per `bittts` subcommand."""

# What the commands that read model files and user text count as bad input (a missing file, a malformed
# model, a wrong option value): `bittts.cli` reports these as one line, not a traceback.
INPUT_ERRORS = (FileNotFoundError, ValueError, RuntimeError)
