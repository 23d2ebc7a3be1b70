"""gunicorn settings for the example: gevent workers, and the pool closed when a worker stops.

Use it with ``gunicorn -c gunicorn.conf.py app:application``; options given on
the command line (``-w 4``, ``--preload``, ``--bind``) override these.
"""

import sys

worker_class = "gevent"
workers = 2
bind = "127.0.0.1:8000"
# A stopping worker finishes its requests in flight for at most this long.
graceful_timeout = 10
# gunicorn 24+ opens a control socket under ~/.gunicorn; this example needs none
# (older versions ignore the unknown setting).
control_socket_disable = True


def worker_exit(server, worker):
    """Close the worker's pool, so that each of its connections says goodbye to the backend.

    Without it the connections still close when the process exits, only
    without the QUIT.  The master's connections (made with ``--preload``)
    are not the worker's to close: geventconnpool already forgot them.
    """
    app = sys.modules.get("app")
    if app is not None:
        app.pool.close()
