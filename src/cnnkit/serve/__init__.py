"""Serve a classifier over HTTP, with a web page: ``create_app(run_dir_or_onnx)``.

See ``app`` for the endpoints and the safety rules; ``runner`` runs it with uvicorn.
"""

from cnnkit.serve.app import SECURITY_HEADERS, ServeSettings, create_app
from cnnkit.serve.model import ServedModel
from cnnkit.serve.runner import background_server, serve

__all__ = [
    "SECURITY_HEADERS",
    "ServeSettings",
    "ServedModel",
    "background_server",
    "create_app",
    "serve",
]
