"""One module per `bittts` subcommand."""
