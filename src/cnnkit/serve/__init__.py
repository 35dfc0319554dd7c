"""Serve a classifier over HTTP, with a web page: ``create_app(run_dir_or_onnx)``.

See ``app`` for the endpoints and the safety rules; ``runner`` runs it with uvicorn.
"""

from cnnkit.extras import require_extra

require_extra("serve", "serving a model")  # one error line instead of a traceback

from cnnkit.serve.app import SECURITY_HEADERS, ServeSettings, create_app  # noqa: E402
from cnnkit.serve.model import ServedModel  # noqa: E402
from cnnkit.serve.runner import background_server, serve  # noqa: E402

__all__ = [
    "SECURITY_HEADERS",
    "ServeSettings",
    "ServedModel",
    "background_server",
    "create_app",
    "serve",
]
