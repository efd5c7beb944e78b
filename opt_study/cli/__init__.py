"""The `opt-study` command: one parser (`main.parser`) listing every subcommand."""
