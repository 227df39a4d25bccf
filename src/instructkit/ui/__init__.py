"""The local web UI (`instructkit ui`): see app.py."""
