"""Graph surgery: compute logits only for the last positions a caller asks for.

Both exporters return full-vocabulary logits for every input position, yet
generation needs only the last one (and option scoring a few): for a 300-token
prompt and a 49k vocabulary that is a 300 x 576 x 49,152 matmul and 59 MB of
output thrown away. A ``num_logits_to_keep`` input (int64 scalar) slices the
hidden states right before the lm_head, as transformers' ``logits_to_keep`` does.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

INPUT = "num_logits_to_keep"
_LM_HEAD_OPS = {"MatMul", "MatMulNBits", "Gemm"}


def keep_last_logits(model_file: Path) -> bool:
    """Add the ``num_logits_to_keep`` input to ``model_file`` in place; False if its lm_head is not recognised.

    Weights in external data files are left untouched (only the graph file is rewritten).
    """
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        return True
    head = next((node for node in graph.node if "logits" in node.output), None)
    if head is None or head.op_type not in _LM_HEAD_OPS:
        return False
    hidden = head.input[0]
    sliced = f"{hidden}/last_positions"
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, []))
    graph.initializer.extend(
        [
            helper.make_tensor("logits_keep/shape", TensorProto.INT64, [1], [1]),
            helper.make_tensor("logits_keep/end", TensorProto.INT64, [1], [2**62]),
            helper.make_tensor("logits_keep/axis", TensorProto.INT64, [1], [1]),
        ]
    )
    nodes = [
        helper.make_node("Reshape", [INPUT, "logits_keep/shape"], ["logits_keep/count"], name="logits_keep/Reshape"),
        helper.make_node("Neg", ["logits_keep/count"], ["logits_keep/start"], name="logits_keep/Neg"),
        helper.make_node(
            "Slice",
            [hidden, "logits_keep/start", "logits_keep/end", "logits_keep/axis"],
            [sliced],
            name="logits_keep/Slice",
        ),
    ]
    head.input[0] = sliced
    position = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    onnx.save(model, str(model_file))
    return True
