"""What TensorRT's ONNX parser accepts, per TensorRT version: ai.onnx opset range, operators, data types.

Type names are ONNX `TensorProto` names. Sources, all in github.com/onnx/onnx-tensorrt:

- "10.3" (JetPack 6): the stored snapshot has no release/10.3-GA; its newest release branch is release/10.1-GA
  (commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c). The table is that branch's docs/operators.md, checked against
  the `DEFINE_BUILTIN_OP_IMPORTER` list of its onnxOpImporters.cpp (the same 150 operators), plus the 10.2 and 10.3
  entries of docs/Changelog.md, which add no operator, type or opset. Tensor types: `convertDtype` in
  importerUtils.cpp on the same branch.
- "10.15": docs/operators.md and importerUtils.cpp at commit fa5aa9f61e7781d2ca8f5351d42c1f19525a6124 (the table's
  header names TensorRT 10.15, opsets 9 to 24); docs/Changelog.md up to its "TensorRT 10.15 GA Release" entry
  (pull request #1048) confirms the additions since 10.3.
- "11": no TensorRT 11 docs/operators.md or branch is stored. TensorRT 11.0 is taken as "10.15" plus the ai.onnx
  operator Swish, the only ai.onnx addition in pull requests #1051 (10.16 GA) and #1054 (11.0 GA); the others are
  TRT_* custom operators. ONNX opset 25 arrived in 11.5 (release/11.5-GA notes), so 11.0 ends at opset 24.
  Swish's types are not documented; the float default is assumed.

One correction to the upstream tables: CumSum takes INT32/INT64 in every version, although operators.md lists
floats only. The 10.1-GA importer builds it from a loop of elementwise sums with no type restriction, and from 10.8
it is an ICumulativeLayer, whose operator documentation lists int32 and int64.

Blocked quantization: every importer since 10.0 infers blocks from the scale's shape (rank equal to the input's)
and never reads the `block_size` attribute; that attribute (and INT4 in QuantizeLinear/DequantizeLinear) is ONNX
opset 21, inside the documented range of 10.15 and 11 but not of 10.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..runtime.errors import InputError

FLOATS = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
INTEGERS = frozenset({"INT32", "INT64"})
BOOL = frozenset({"BOOL"})


@dataclass(frozen=True)
class TensorRTSupport:
    """What one TensorRT version's ONNX parser accepts."""

    version: str
    opsets: tuple[int, int]  # inclusive range of the ai.onnx opset
    operators: frozenset[str]  # ai.onnx operators it imports
    integer_ops: frozenset[str]  # operators whose data input may be INT32 or INT64
    bool_ops: frozenset[str]  # operators whose data input may be BOOL
    data_type_exceptions: Mapping[str, frozenset[str]]  # operators whose data input types break that rule
    quantized_types: frozenset[str]  # what QuantizeLinear/DequantizeLinear may quantize to
    tensor_types: frozenset[str]  # every type TensorRT has tensors of (DOUBLE is cast to FLOAT, so not one)

    def data_types(self, op_type: str) -> frozenset[str]:
        """The non-quantized types an operator's data input may have."""
        if op_type in self.data_type_exceptions:
            return self.data_type_exceptions[op_type]
        integers = INTEGERS if op_type in self.integer_ops else frozenset()
        return FLOATS | integers | (BOOL if op_type in self.bool_ops else frozenset())


_OPERATORS_10_3 = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN
    LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max
    MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
    ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
_OPERATORS_10_15 = _OPERATORS_10_3 | {
    "Attention",
    "BlackmanWindow",
    "HammingWindow",
    "HannWindow",
    "RMSNormalization",
    "RotaryEmbedding",
    "STFT",
    "TensorScatter",
}

_INTEGER_OPS_10_3 = frozenset(
    """
    Abs Add ArgMax ArgMin Concat Constant ConstantOfShape CumSum DepthToSpace Div Equal Expand EyeLike Flatten
    Gather GatherElements GatherND Gelu Greater GreaterOrEqual Identity If IsNaN Less LessOrEqual Loop Max Mean Min
    Mod Mul Neg OneHot Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape ReverseSequence Scatter ScatterElements ScatterND Shape
    Shrink Sign Size Slice SpaceToDepth Split Squeeze Sub Sum Tile TopK Transpose Trilu Unsqueeze Where
    """.split()
)
_BOOL_OPS = frozenset(
    """
    Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot
    Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where
    """.split()
)

_FLOAT32_FLOAT16 = frozenset({"FLOAT", "FLOAT16"})
_EXCEPTIONS_10_3 = {
    **dict.fromkeys(("And", "Not", "Or", "Xor"), BOOL),
    **dict.fromkeys(("Cast", "CastLike"), FLOATS | INTEGERS | BOOL | {"UINT8"}),
    **dict.fromkeys(("DeformConv", "GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign"), _FLOAT32_FLOAT16),
}
_EXCEPTIONS_10_15 = {
    **_EXCEPTIONS_10_3,
    **dict.fromkeys(("BlackmanWindow", "HammingWindow", "HannWindow"), _FLOAT32_FLOAT16),
    "STFT": frozenset({"FLOAT"}),
    "TensorScatter": FLOATS | {"INT32"},
}

_QUANTIZED_10_3 = frozenset({"INT8", "FLOAT8E4M3FN", "INT4"})
_TENSOR_TYPES_10_3 = FLOATS | INTEGERS | BOOL | _QUANTIZED_10_3 | {"UINT8"}

_SUPPORT_10_15 = TensorRTSupport(
    version="10.15",
    opsets=(9, 24),
    operators=_OPERATORS_10_15,
    integer_ops=_INTEGER_OPS_10_3 | {"Pow"},
    bool_ops=_BOOL_OPS,
    data_type_exceptions=_EXCEPTIONS_10_15,
    quantized_types=_QUANTIZED_10_3 | {"FLOAT4E2M1"},
    tensor_types=_TENSOR_TYPES_10_3 | {"FLOAT4E2M1"},
)

SUPPORT = {
    "10.3": TensorRTSupport(
        version="10.3",
        opsets=(9, 20),
        operators=_OPERATORS_10_3,
        integer_ops=_INTEGER_OPS_10_3,
        bool_ops=_BOOL_OPS,
        data_type_exceptions=_EXCEPTIONS_10_3,
        quantized_types=_QUANTIZED_10_3,
        tensor_types=_TENSOR_TYPES_10_3,
    ),
    "10.15": _SUPPORT_10_15,
    "11": replace(_SUPPORT_10_15, version="11", operators=_OPERATORS_10_15 | {"Swish"}),
}
TRT_VERSIONS = tuple(SUPPORT)
# The oldest TensorRT we target (JetPack 6 on Jetson): a graph that passes it is what we promise Jetson users.
DEFAULT_TRT_VERSION = "10.3"


def support_for(trt_version: str) -> TensorRTSupport:
    """The table of one TensorRT version; an unknown version is an `InputError`."""
    if trt_version not in SUPPORT:
        raise InputError(f"unknown TensorRT version {trt_version!r}; known versions: {', '.join(TRT_VERSIONS)}")
    return SUPPORT[trt_version]
