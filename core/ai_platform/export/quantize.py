"""Weight quantization of an exported fp32 graph with onnxruntime's own quantizer.

int8 and int4 both become ``MatMulNBits`` (symmetric blocks of 32, int8 activations in the kernel),
as onnxruntime-genai's builder emits for the CPU, so a precision means the same on either path.
Dynamic int8 (``MatMulInteger``) decoded SmolLM2 no faster and moved its logits ~8x further from
torch's (its per-channel variant: garbage on AVX2). The embedding stays fp32: the builder's int4
quantizes it too, halving SmolLM2, but that leaves the tiny test model's first token at torch's 250th.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.quantization.shape_inference import quant_pre_process

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fast CPU kernels, as the builder's CPU default


def quantize(model_file: Path, precision: str, work: Path) -> None:
    """Quantize the weights of ``model_file`` in place; weights kept in external data stay external."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as error:  # onnx-ir, which optimum does not pull in
        raise RuntimeError(f"{precision} export needs {error.name} in the export environment") from error
    # The module configures the root logger to log every node at INFO on import.
    logging.getLogger().setLevel(logging.WARNING)

    data_files = _external_data_files(model_file)
    folded = work / "folded.onnx"
    # The quantizer takes only MatMuls with constant weights, and a tied lm_head (SmolLM2, Qwen2.5) reads a
    # Transpose of the embedding: its own pre-processing folds that into a constant, so the largest matmul
    # is quantized too (at the price of a quantized copy of the embedding).
    quant_pre_process(
        model_file,
        folded,
        skip_symbolic_shape=True,
        skip_onnx_shape=True,
        save_as_external_data=bool(data_files),
        all_tensors_to_one_file=True,
        external_data_location=f"{folded.name}.data",
    )
    quantizer = MatMulNBitsQuantizer(
        str(folded), bits=BITS[precision], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    for name in (model_file.name, *data_files):
        (model_file.parent / name).unlink()
    quantizer.model.save_model_to_file(str(model_file), use_external_data_format=bool(data_files))


def _external_data_files(model_file: Path) -> set[str]:
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {
        entry.value
        for tensor in graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
