"""Mixed-precision ONNX for strongly typed TensorRT builds (TensorRT 11.x has no FP16 builder flag).

The convolutional trunk runs in fp16; the input normalisation ((x - mean) / std),
global pooling, the linear head and the L2 normalisation stay in fp32, and the
model's input and output stay float32 [B, 3, S, S] -> [B, D].

Region rule (explicit, for the ResNet/GoogLeNet encoders exported by ``export.to_onnx``):
the fp16 region is every node from the first ``Conv`` up to (not including) the
first node after the last ``Conv`` that is not one of the trunk operators
(Conv, Relu, Add, MaxPool, AveragePool, Concat, BatchNormalization, Identity).  Float tensors that
enter the region get a ``Cast`` to fp16, tensors that leave it a ``Cast`` back
to fp32, and the region's float32 initializers are stored as fp16.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["TRUNK_OPS", "convert_trunk_to_fp16", "fp16_region"]

TRUNK_OPS = frozenset({"Conv", "Relu", "Add", "MaxPool", "AveragePool", "Concat", "BatchNormalization", "Identity"})


def fp16_region(graph: onnx.GraphProto) -> list[int]:
    """Indices of the nodes that run in fp16 (see module docstring); [] when the graph has no Conv."""
    nodes = list(graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        return []
    end = convs[-1] + 1
    while end < len(nodes) and nodes[end].op_type in TRUNK_OPS:
        end += 1
    region = [i for i in range(convs[0], end) if nodes[i].op_type in TRUNK_OPS]
    return region


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors (inputs, initializers, inferred intermediates, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    return out


def convert_trunk_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the convolutional trunk in fp16 (I/O, normalisation and head fp32).

    Raises:
        ValueError: when the graph has no convolution (nothing to convert).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())  # deep copy
    g = model.graph
    region_idx = fp16_region(g)
    if not region_idx:
        raise ValueError("the graph has no Conv node; cannot build an fp16 trunk")
    floats = _float_tensors(model)
    nodes = list(g.node)
    region = set(region_idx)
    produced_in = {o for i in region_idx for o in nodes[i].output}
    inits = {t.name: t for t in g.initializer}

    # Tensors consumed outside the region (or graph outputs) that the region produces.
    graph_outputs = {o.name for o in g.output}
    leaving = set()
    for i, n in enumerate(nodes):
        if i not in region:
            leaving.update(x for x in n.input if x in produced_in)
    leaving.update(x for x in graph_outputs if x in produced_in)

    # Initializers used by the region: fp16 copies (a separate copy when also used outside).
    used_outside = {x for i, n in enumerate(nodes) if i not in region for x in n.input}
    renamed: dict[str, str] = {}
    for i in region_idx:
        for x in nodes[i].input:
            if x in inits and inits[x].data_type == TensorProto.FLOAT and x not in renamed:
                arr = numpy_helper.to_array(inits[x]).astype(np.float16)
                if x in used_outside:
                    new = f"{x}__fp16"
                    g.initializer.append(numpy_helper.from_array(arr, new))
                    renamed[x] = new
                else:
                    inits[x].CopyFrom(numpy_helper.from_array(arr, x))
                    renamed[x] = x

    new_nodes: list[onnx.NodeProto] = []
    cast_in: dict[str, str] = {}
    for i, n in enumerate(nodes):
        if i in region:
            for j, x in enumerate(n.input):
                if x in renamed:
                    n.input[j] = renamed[x]
                elif x and x not in produced_in and x in floats:  # fp32 tensor entering the region
                    if x not in cast_in:
                        cast_in[x] = f"{x}__to_fp16"
                        new_nodes.append(helper.make_node("Cast", [x], [cast_in[x]], to=TensorProto.FLOAT16,
                                                          name=f"{x}__cast_fp16"))
                    n.input[j] = cast_in[x]
            new_nodes.append(n)
            for o in n.output:
                if o in leaving and o in floats:  # float region output used in fp32 afterwards
                    n.output[list(n.output).index(o)] = f"{o}__fp16"
                    new_nodes.append(helper.make_node("Cast", [f"{o}__fp16"], [o], to=TensorProto.FLOAT,
                                                      name=f"{o}__cast_fp32"))
        else:
            new_nodes.append(n)
    # Region-internal consumers of a renamed output must read the fp16 name.
    renamed_out = {o: f"{o}__fp16" for o in leaving if o in floats}
    region_ids = {id(nodes[i]) for i in region_idx}
    for n in new_nodes:
        if id(n) in region_ids:
            for j, x in enumerate(n.input):
                if x in renamed_out:
                    n.input[j] = renamed_out[x]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale types; re-inferred below
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model
