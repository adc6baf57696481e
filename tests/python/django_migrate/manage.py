#!/usr/bin/env python
"""Django's command-line utility for the schema-change project (see tests/it/django_shop.rs)."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "migrate_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
