"""edgeprune device agent: the small process that runs on each edge device.

Nothing heavy is imported here: TensorFlow and LiteRT load only in the code
paths (training worker, benchmark) that need them, so an idle agent stays small.
"""

__version__ = "0.1.0"
