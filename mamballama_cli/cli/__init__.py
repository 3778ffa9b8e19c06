"""The Typer CLI: one thin file per command; each builds a config object and calls one core function."""
