"""modgate worker: fetch, decode, batch, detect, aggregate and publish image verdicts.

Importing this package must stay cheap: nothing here imports torch, onnxruntime or
transformers until a detector is loaded inside a worker process.
"""

__version__ = "0.1.0"
