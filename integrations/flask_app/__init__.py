"""The Flask example (see app.py)."""
