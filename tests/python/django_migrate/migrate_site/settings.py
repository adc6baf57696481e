"""Settings of the schema-change project: one app, `catalog`, on the database that libpq's
variables name (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD), as the test sets them."""
import os

SECRET_KEY = "django-insecure-post-save-schema-change-test"
DEBUG = False
INSTALLED_APPS = ["catalog"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["PGDATABASE"],
        "USER": os.environ.get("PGUSER", ""),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
