"""Running a model on images, with no transport: the one code path that the server, the offline
``simclr embed --model`` job and the Ray job all use.

``images`` turns image bytes or raw pixels into the model's uint8 ``[S, S, 3]`` input (decode,
validate, resize by the model's own ``simclr.resize`` policy); ``runtime`` opens a model file as a
:class:`~simclr_embed.inference.runtime.Runtime` (``onnx_runtime`` for ``.onnx``, ``torch_runtime``
for a ``.pt2`` program) whose ``encode(uint8 [N, S, S, 3])`` returns ``features`` / ``projection``.
"""
