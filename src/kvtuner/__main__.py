"""``python -m kvtuner``: the CLI (how ``kvtuner search --workers N`` starts its worker processes)."""

from kvtuner.cli import app

app()
