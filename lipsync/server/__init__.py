"""Everything HTTP: the Flask app over the pipeline (``lipsync.service``) and the job queue.

    from lipsync.server import create_app
    app = create_app({"SETTINGS": Settings(...), "SERVER": ServerSettings(...)})

Modules: ``factory`` (create_app / close_app), the blueprints ``pages``, ``api`` (generate,
health, avatar, OpenAPI), ``jobs_api`` and ``ops`` (metrics); ``request_inputs`` (what a
request asks for, checked), ``hooks`` (API keys, rate limits, CORS, security headers, JSON
errors); ``security``, ``lifecycle`` (render slots, graceful shutdown), ``observability``
(logs, metrics), ``state_metrics``, ``openapi``; ``serve`` (``python app.py``)
and ``gunicorn_conf`` (production). Nothing outside this package imports Flask.
"""

from lipsync.server.factory import close_app, create_app

__all__ = ["close_app", "create_app"]
