"""The Celery app: `python -m celery -A shopsite worker`.

post-save enqueues the tasks (Celery protocol v2 on the Redis broker); this worker runs them.
Nothing in the Django code calls `.delay()`.
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")

app = Celery("shopsite")
# Every CELERY_* setting in shopsite/settings.py configures the app.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
