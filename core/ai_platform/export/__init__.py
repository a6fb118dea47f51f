"""Offline export of Hugging Face models to the ONNX folders the server loads.

Runs in its own environment (torch, transformers, optimum), never in the server's,
so it imports from the rest of ``ai_platform`` only what needs no server dependency:
``runtime.manifest`` (the sha256 manifest, standard library) and ``runtime.scheduler``'s
``finish_reason`` (the one stop check, numpy). The server reads only what an export
recorded, through ``model_folder.read_export_record``.
"""

import os

# Machines here have no hub access; fail fast on any attempted download instead of
# hanging on network timeouts. Set before transformers is imported anywhere below.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
