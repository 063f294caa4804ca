from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "images")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("pixels", "scaled", "encoded")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    scaled: ScaledPixels
    encoded: bytes
    def __init__(self, pixels: _Optional[bytes] = ..., scaled: _Optional[_Union[ScaledPixels, _Mapping]] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class ScaledPixels(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "predictions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "probabilities")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "policy", "serving_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy: str
    serving_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., policy: _Optional[str] = ..., serving_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "error", "manifest")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[VersionStatus.State]
        LOADING: _ClassVar[VersionStatus.State]
        SERVING: _ClassVar[VersionStatus.State]
        STANDBY: _ClassVar[VersionStatus.State]
        REJECTED: _ClassVar[VersionStatus.State]
    STATE_UNSPECIFIED: VersionStatus.State
    LOADING: VersionStatus.State
    SERVING: VersionStatus.State
    STANDBY: VersionStatus.State
    REJECTED: VersionStatus.State
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionStatus.State
    error: str
    manifest: ManifestSummary
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionStatus.State, str]] = ..., error: _Optional[str] = ..., manifest: _Optional[_Union[ManifestSummary, _Mapping]] = ...) -> None: ...

class ManifestSummary(_message.Message):
    __slots__ = ("sizes", "activations", "dtype", "labels", "input_offset", "input_scale", "test_accuracy", "test_loss", "job_id", "created_at", "weights_sha256", "parameter_count")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    activations: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_offset: float
    input_scale: float
    test_accuracy: float
    test_loss: float
    job_id: str
    created_at: str
    weights_sha256: str
    parameter_count: int
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., activations: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_offset: _Optional[float] = ..., input_scale: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., job_id: _Optional[str] = ..., created_at: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., parameter_count: _Optional[int] = ...) -> None: ...
