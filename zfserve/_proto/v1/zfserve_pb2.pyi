from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Images(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: Tensor
    def __init__(self, encoded: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "images", "top_k", "return_probabilities")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Images
    top_k: int
    return_probabilities: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., top_k: _Optional[int] = ..., return_probabilities: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "name", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class OutOfDistribution(_message.Message):
    __slots__ = ("score", "threshold", "out_of_distribution")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    score: float
    threshold: float
    out_of_distribution: bool
    def __init__(self, score: _Optional[float] = ..., threshold: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("classes", "ood")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    ood: OutOfDistribution
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., ood: _Optional[_Union[OutOfDistribution, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "model_version", "predictions", "probabilities", "ood_note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    OOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    probabilities: Tensor
    ood_note: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., ood_note: _Optional[str] = ...) -> None: ...

class Unit(_message.Message):
    __slots__ = ("channel", "y", "x")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    channel: int
    y: int
    x: int
    def __init__(self, channel: _Optional[int] = ..., y: _Optional[int] = ..., x: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("y0", "x0", "y1", "x1")
    Y0_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    y0: int
    x0: int
    y1: int
    x1: int
    def __init__(self, y0: _Optional[int] = ..., x0: _Optional[int] = ..., y1: _Optional[int] = ..., x1: _Optional[int] = ...) -> None: ...

class DeconvRequest(_message.Message):
    __slots__ = ("model", "images", "layer", "top_k", "allow_same_map", "units", "return_png", "return_tensor", "return_patches", "maps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SAME_MAP_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    RETURN_TENSOR_FIELD_NUMBER: _ClassVar[int]
    RETURN_PATCHES_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Images
    layer: str
    top_k: int
    allow_same_map: bool
    units: _containers.RepeatedCompositeFieldContainer[Unit]
    return_png: bool
    return_tensor: bool
    return_patches: bool
    maps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., layer: _Optional[str] = ..., top_k: _Optional[int] = ..., allow_same_map: _Optional[bool] = ..., units: _Optional[_Iterable[_Union[Unit, _Mapping]]] = ..., return_png: _Optional[bool] = ..., return_tensor: _Optional[bool] = ..., return_patches: _Optional[bool] = ..., maps: _Optional[_Iterable[int]] = ...) -> None: ...

class Projection(_message.Message):
    __slots__ = ("image_index", "layer", "unit", "activation", "box", "png", "patch_png")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PATCH_PNG_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    layer: str
    unit: Unit
    activation: float
    box: Box
    png: bytes
    patch_png: bytes
    def __init__(self, image_index: _Optional[int] = ..., layer: _Optional[str] = ..., unit: _Optional[_Union[Unit, _Mapping]] = ..., activation: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., png: _Optional[bytes] = ..., patch_png: _Optional[bytes] = ...) -> None: ...

class DeconvResponse(_message.Message):
    __slots__ = ("model", "projections", "tensor", "model_version", "interpretation", "ood", "ood_note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    OOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    projections: _containers.RepeatedCompositeFieldContainer[Projection]
    tensor: Tensor
    model_version: str
    interpretation: str
    ood: _containers.RepeatedCompositeFieldContainer[OutOfDistribution]
    ood_note: str
    def __init__(self, model: _Optional[str] = ..., projections: _Optional[_Iterable[_Union[Projection, _Mapping]]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., model_version: _Optional[str] = ..., interpretation: _Optional[str] = ..., ood: _Optional[_Iterable[_Union[OutOfDistribution, _Mapping]]] = ..., ood_note: _Optional[str] = ...) -> None: ...

class OcclusionRequest(_message.Message):
    __slots__ = ("model", "images", "window", "stride", "fill_value", "fill_per_channel", "fill_in_pixels", "target", "outputs", "activity_layer", "activity_channel", "attribution_on_logits", "return_png", "engine", "precision", "approximation", "coarse", "refine", "margin", "gated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    FILL_VALUE_FIELD_NUMBER: _ClassVar[int]
    FILL_PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    FILL_IN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_ON_LOGITS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PNG_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATION_FIELD_NUMBER: _ClassVar[int]
    COARSE_FIELD_NUMBER: _ClassVar[int]
    REFINE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: Images
    window: int
    stride: int
    fill_value: float
    fill_per_channel: Tensor
    fill_in_pixels: bool
    target: int
    outputs: _containers.RepeatedScalarFieldContainer[str]
    activity_layer: str
    activity_channel: int
    attribution_on_logits: bool
    return_png: bool
    engine: str
    precision: str
    approximation: str
    coarse: int
    refine: int
    margin: float
    gated: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., fill_value: _Optional[float] = ..., fill_per_channel: _Optional[_Union[Tensor, _Mapping]] = ..., fill_in_pixels: _Optional[bool] = ..., target: _Optional[int] = ..., outputs: _Optional[_Iterable[str]] = ..., activity_layer: _Optional[str] = ..., activity_channel: _Optional[int] = ..., attribution_on_logits: _Optional[bool] = ..., return_png: _Optional[bool] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., approximation: _Optional[str] = ..., coarse: _Optional[int] = ..., refine: _Optional[int] = ..., margin: _Optional[float] = ..., gated: _Optional[bool] = ...) -> None: ...

class OcclusionResponse(_message.Message):
    __slots__ = ("model", "target", "positions_y", "positions_x", "probability", "argmax", "activity", "attribution", "activity_layer", "activity_channel", "png", "base_probability", "base_activity", "starts", "window", "stride", "fill", "fill_units", "attribution_on", "backend", "seconds", "model_version", "ood", "ood_note", "engine", "precision", "mode", "evaluated", "gate")
    class PngEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_Y_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_X_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    BASE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    BASE_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    FILL_UNITS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_ON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    OOD_NOTE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    target: int
    positions_y: int
    positions_x: int
    probability: Tensor
    argmax: Tensor
    activity: Tensor
    attribution: Tensor
    activity_layer: str
    activity_channel: int
    png: _containers.ScalarMap[str, bytes]
    base_probability: float
    base_activity: float
    starts: _containers.RepeatedScalarFieldContainer[int]
    window: int
    stride: int
    fill: _containers.RepeatedScalarFieldContainer[float]
    fill_units: str
    attribution_on: str
    backend: str
    seconds: float
    model_version: str
    ood: OutOfDistribution
    ood_note: str
    engine: str
    precision: str
    mode: str
    evaluated: Tensor
    gate: str
    def __init__(self, model: _Optional[str] = ..., target: _Optional[int] = ..., positions_y: _Optional[int] = ..., positions_x: _Optional[int] = ..., probability: _Optional[_Union[Tensor, _Mapping]] = ..., argmax: _Optional[_Union[Tensor, _Mapping]] = ..., activity: _Optional[_Union[Tensor, _Mapping]] = ..., attribution: _Optional[_Union[Tensor, _Mapping]] = ..., activity_layer: _Optional[str] = ..., activity_channel: _Optional[int] = ..., png: _Optional[_Mapping[str, bytes]] = ..., base_probability: _Optional[float] = ..., base_activity: _Optional[float] = ..., starts: _Optional[_Iterable[int]] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., fill: _Optional[_Iterable[float]] = ..., fill_units: _Optional[str] = ..., attribution_on: _Optional[str] = ..., backend: _Optional[str] = ..., seconds: _Optional[float] = ..., model_version: _Optional[str] = ..., ood: _Optional[_Union[OutOfDistribution, _Mapping]] = ..., ood_note: _Optional[str] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., mode: _Optional[str] = ..., evaluated: _Optional[_Union[Tensor, _Mapping]] = ..., gate: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class OcclusionEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: OcclusionResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[OcclusionResponse, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "num_classes", "ready", "reason", "oip_version", "precision", "engine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OIP_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    num_classes: int
    ready: bool
    reason: str
    oip_version: str
    precision: str
    engine: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., num_classes: _Optional[int] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ..., oip_version: _Optional[str] = ..., precision: _Optional[str] = ..., engine: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape", "parameters", "receptive_field", "stride")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    parameters: int
    receptive_field: int
    stride: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., parameters: _Optional[int] = ..., receptive_field: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "num_classes", "class_names", "input_shape", "layers", "preprocess_json", "oip_version", "precision", "engine", "ood", "training_data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    OIP_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    preprocess_json: str
    oip_version: str
    precision: str
    engine: str
    ood: OodInfo
    training_data: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., preprocess_json: _Optional[str] = ..., oip_version: _Optional[str] = ..., precision: _Optional[str] = ..., engine: _Optional[str] = ..., ood: _Optional[_Union[OodInfo, _Mapping]] = ..., training_data: _Optional[str] = ...) -> None: ...

class OodInfo(_message.Message):
    __slots__ = ("available", "method", "threshold", "acceptance", "data", "note")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    available: bool
    method: str
    threshold: float
    acceptance: float
    data: str
    note: str
    def __init__(self, available: _Optional[bool] = ..., method: _Optional[str] = ..., threshold: _Optional[float] = ..., acceptance: _Optional[float] = ..., data: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...
