"""Registers the long-running commands (training, benchmark) with the daemon.

Kept apart from :mod:`.daemon` so the presence/command core reads on its own;
nothing here imports TensorFlow or LiteRT at import time.
"""
