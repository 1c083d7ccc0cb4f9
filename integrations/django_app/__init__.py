"""The one-file Django example (see app.py)."""
