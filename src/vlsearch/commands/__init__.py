"""One module per CLI subcommand: each has ``register(subparsers)`` and ``run(args)``."""

COMMANDS = ["demo", "train", "index", "search", "eval", "serve", "bench"]
