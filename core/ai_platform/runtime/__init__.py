"""Model runtime: ONNX decoder models on onnxruntime (CPU or CUDA), no torch.

The orchestration layer talks only to :class:`~ai_platform.runtime.engine.InferenceEngine`
(the :class:`~ai_platform.engine_contract.Engine`); everything below it is private to this package:

* ``served_model`` / ``model_process``: a loaded model, in this process or a supervised child process;
* ``engine_loop``: the model's thread, which executes what the ``scheduler`` decides: which work
  starts, whose turn it is, what each decode step does and when a sequence finishes;
* ``model_runner``: a step's forward passes and sampling, on the KV caches of ``kv_batch``;
* ``generation`` (token picking, prefill, option scoring), ``model`` (a model folder: tokenizer, chat
  template, decoder), ``onnx_model``, ``prefix_cache``, ``stop_strings``, ``tokenizer``, ``manifest``.

This package's import runs nothing heavy, so the export tools (another environment) can use its
light modules (``manifest``, the stop check): import ``ai_platform.runtime.engine`` for the engine.
"""
