"""mmsep beyond one process: ``mmsep-batch`` (JSONL jobs, resumable, in this process or on Ray
Data) and ``mmsep-serve`` (HTTP on Ray Serve, requests batched together).

Uses only the runtime's public API (``Separator`` and the mmsep-run checks); never imports torch,
mmsep.models or mmsep.export. Ray is imported only by the code paths that need it (the optional
``ray`` extra).
"""
