"""One module per CLI subcommand: each has ``register(subparsers)`` and ``run(args)``."""

COMMANDS = ["demo", "train", "index", "watch", "search", "eval", "serve", "bench"]
