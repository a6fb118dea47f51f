"""Offline export of Hugging Face models to the ONNX folders the server loads.

Runs in its own environment (torch, transformers, optimum), never in the server's,
so nothing here imports other ``ai_platform`` modules. The server reads only what an
export recorded, through ``model_folder.read_export_record`` (numpy at most).
"""

import os

# Machines here have no hub access; fail fast on any attempted download instead of
# hanging on network timeouts. Set before transformers is imported anywhere below.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
