"""One module per `bts` subcommand: HELP, add_arguments(parser), run(args) -> exit code."""
