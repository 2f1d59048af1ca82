"""The Celery app of the workers: ``celery -A workers.app worker`` finds ``app`` here.

It is built from settings in flickd/core/broker.py, where the queues and task names live too.
"""

from flickd.core.broker import get_app

app = get_app()
