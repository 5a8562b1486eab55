"""The Open Inference Protocol (KServe V2) over gRPC: ``inference.GRPCInferenceService`` on the
gRPC port beside ``simclr.v1``, a thin adapter of the same request path (``server.core``).

``ModelInfer`` takes ``images`` from ``raw_input_contents`` (what tritonclient sends) or from
``contents.bytes_contents`` / ``uint_contents``, and always answers in ``raw_output_contents``
(little-endian float32 ``[N, D]`` per output), as Triton does. Request parameters: ``normalize``
(bool). The deadline is the call's own (``grpc-timeout``).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from simclr_embed import tracing
from simclr_embed.pb.inference import grpc_predict_v2_pb2 as v2
from simclr_embed.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from simclr_embed.server.core import STATUS, EmbedOptions, InvalidRequest, RequestError, RequestPath
from simclr_embed.server.metrics import Metrics
from simclr_embed.server.rpc import abort, caller_gone, gone_code
from simclr_embed.server.v2_tensors import (
    EXTENSIONS,
    INPUT,
    SERVER_NAME,
    UnknownModel,
    check_model,
    images_from_tensor,
    model_metadata,
    requested_outputs,
    server_version,
)

log = logging.getLogger(__name__)

PROTOCOL = "v2-grpc"
SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Probes: answered without a token, like grpc.health.v1.
HEALTH_METHODS = tuple(
    f"/{SERVICE_NAME}/{name}" for name in ("ServerLive", "ServerReady", "ModelReady")
)


def _param(params: object, key: str) -> object:
    if key not in params:  # type: ignore[operator]
        return None
    p = params[key]  # type: ignore[index]
    return getattr(p, p.WhichOneof("parameter_choice") or "bool_param")


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: RequestPath, metrics: Metrics, model_name: str) -> None:
        self.path, self._metrics, self.model_name = path, metrics, model_name

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: object
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: object
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.path.accepting)

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelReadyResponse:
        await self._check_model(request.name, request.version, context)
        return v2.ModelReadyResponse(ready=self.path.accepting)

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: object
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        backend = self.path.backend
        if backend is None:
            await abort(context, grpc.StatusCode.UNAVAILABLE, self.path.refusal)
        meta = model_metadata(backend.info, self.model_name)
        tensors = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=self.model_name,
            versions=meta["versions"],  # type: ignore[arg-type]
            platform=str(meta["platform"]),
            inputs=[tensors(**t) for t in meta["inputs"]],  # type: ignore[attr-defined]
            outputs=[tensors(**t) for t in meta["outputs"]],  # type: ignore[attr-defined]
        )

    async def _check_model(
        self, name: str, version: str, context: grpc.aio.ServicerContext
    ) -> None:
        backend = self.path.backend
        try:
            check_model(name, version, self.model_name, None if backend is None else backend.info)
        except UnknownModel as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelInferResponse:
        if tracing.enabled():
            tracing.INCOMING.set(
                (f"{SERVICE_NAME}/ModelInfer", dict(context.invocation_metadata() or ()))
            )
        if not self.path.enter():
            self._metrics.request_done("UNAVAILABLE", 0, PROTOCOL)
            await abort(context, grpc.StatusCode.UNAVAILABLE, self.path.refusal)
        try:
            response = await self._infer(request, context)
        except RequestError as exc:
            code = getattr(grpc.StatusCode, STATUS[exc.status])
            if caller_gone(context):
                self._metrics.request_done(gone_code(context), 0, PROTOCOL)
                raise asyncio.CancelledError from None
            self._metrics.request_done(code.name, 0, PROTOCOL)
            await abort(context, code, exc.message)
        except UnknownModel as exc:
            self._metrics.request_done("NOT_FOUND", 0, PROTOCOL)
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except asyncio.CancelledError:
            self._metrics.request_done(gone_code(context), 0, PROTOCOL)
            raise
        except Exception as exc:
            self._metrics.request_done("INTERNAL", 0, PROTOCOL)
            log.exception("ModelInfer failed")
            await abort(
                context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            )
        finally:
            self.path.leave()
        rows = response.outputs[0].shape[0] if response.outputs else 0
        self._metrics.request_done("OK", int(rows), PROTOCOL)
        return response

    async def _infer(
        self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelInferResponse:
        backend = self.path.backend
        check_model(
            request.model_name,
            request.model_version,
            self.model_name,
            None if backend is None else backend.info,
        )
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise InvalidRequest(f"expected exactly one input, {INPUT!r}")
        tensor = request.inputs[0]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidRequest("raw_input_contents must hold one entry per input")
            raw, elements = request.raw_input_contents[0], None
        elif tensor.datatype == "BYTES":
            raw, elements = None, list(tensor.contents.bytes_contents)
        else:
            raw, elements = None, list(tensor.contents.uint_contents)
        images = images_from_tensor(tensor.datatype, list(tensor.shape), raw, elements)
        outputs = requested_outputs([o.name for o in request.outputs])
        normalize = _param(request.parameters, "normalize")
        if normalize is not None and not isinstance(normalize, bool):
            raise InvalidRequest("parameter 'normalize' must be a bool")
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        opts = EmbedOptions(
            output=outputs[0],
            also=outputs[1:],
            normalize=bool(normalize),
            deadline=None if remaining is None else loop.time() + remaining,
        )
        answer = await self.path.embed(images, opts)
        response = v2.ModelInferResponse(
            model_name=self.model_name, model_version=answer.model_version, id=request.id
        )
        for name in outputs:
            vectors = np.ascontiguousarray(answer.matrix(name), dtype="<f4")  # [n, D]
            response.outputs.add(name=name, datatype="FP32", shape=list(vectors.shape))
            response.raw_output_contents.append(vectors.tobytes())
        return response
