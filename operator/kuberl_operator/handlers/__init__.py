"""One module per event; main.py registers them with kopf."""
