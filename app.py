"""The web service: ``python app.py`` serves http://localhost:3000 (``PORT`` overrides).

Production: ``gunicorn -c python:lipsync.server.gunicorn_conf`` (``make serve``), which loads
``app:create_app()``. Everything HTTP lives in ``lipsync/server/``.
"""

from lipsync.server import create_app
from lipsync.server.serve import main

__all__ = ["create_app"]

if __name__ == "__main__":
    main()
