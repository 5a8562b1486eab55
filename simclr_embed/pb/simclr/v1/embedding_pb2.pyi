from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbeddingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_KIND_UNSPECIFIED: _ClassVar[EmbeddingKind]
    EMBEDDING_KIND_FEATURES: _ClassVar[EmbeddingKind]
    EMBEDDING_KIND_PROJECTION: _ClassVar[EmbeddingKind]
EMBEDDING_KIND_UNSPECIFIED: EmbeddingKind
EMBEDDING_KIND_FEATURES: EmbeddingKind
EMBEDDING_KIND_PROJECTION: EmbeddingKind

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "channels")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    channels: int
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "kind", "l2_normalize", "per_image_errors", "packed")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    L2_NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    PER_IMAGE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    kind: EmbeddingKind
    l2_normalize: bool
    per_image_errors: bool
    packed: bool
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., kind: _Optional[_Union[EmbeddingKind, str]] = ..., l2_normalize: _Optional[bool] = ..., per_image_errors: _Optional[bool] = ..., packed: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "kind", "dimension", "model_version", "errors", "packed_embeddings", "timings")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PACKED_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    kind: EmbeddingKind
    dimension: int
    model_version: str
    errors: _containers.RepeatedCompositeFieldContainer[ImageError]
    packed_embeddings: bytes
    timings: StageTimings
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., kind: _Optional[_Union[EmbeddingKind, str]] = ..., dimension: _Optional[int] = ..., model_version: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[ImageError, _Mapping]]] = ..., packed_embeddings: _Optional[bytes] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "inference_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    inference_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_version", "arch", "image_size", "feature_dimension", "projection_dimension", "max_batch_size", "providers")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    arch: str
    image_size: int
    feature_dimension: int
    projection_dimension: int
    max_batch_size: int
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_version: _Optional[str] = ..., arch: _Optional[str] = ..., image_size: _Optional[int] = ..., feature_dimension: _Optional[int] = ..., projection_dimension: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...
