"""The app that keeps saving while `manage.py migrate` runs (tests/it/django_shop.rs).

Run as `python saver.py <dir>`. Each round creates an item (`Model.save()`, an INSERT), changes
it with `Model.save()` (an UPDATE) and with `QuerySet.update()` (an UPDATE Django sends no
signal for), each save with a marker of its own in `name`. Every save is reported as one line
of JSON on stdout, `{"marker": …, "phase": …, "error": null or "…"}`; a save's phase is
"before" when it began before `<dir>/migrating` existed, "after" when it began once
`<dir>/migrated` existed, else "during". It stops once `<dir>/stop` exists, with a last line
`{"done": true}`.

The model is the app as deployed while the migration runs: it names only the columns both
schemas have, as a zero-downtime deploy does (code that used `legacy_code` or `coupon` was
retired before the migration, code that uses `note` or `promo_code` ships after it). So any
failed save is the database's doing, not Django's.
"""
import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "migrate_site.settings")
django.setup()

from django.db import models  # noqa: E402  (after setup, as Django requires)


class DeployedItem(models.Model):
    name = models.CharField(max_length=100)
    stock = models.IntegerField(default=0)

    class Meta:
        app_label = "catalog"
        db_table = "catalog_item"
        managed = False


def phase(work):
    if os.path.exists(os.path.join(work, "migrated")):
        return "after"
    if os.path.exists(os.path.join(work, "migrating")):
        return "during"
    return "before"


def save(work, marker, action):
    """Runs one save; reports it and returns whether it succeeded."""
    when = phase(work)
    error = None
    try:
        action()
    except Exception as failure:  # any failure of the write is what the test looks for
        error = f"{type(failure).__name__}: {failure}"
    print(json.dumps({"marker": marker, "phase": when, "error": error}), flush=True)
    return error is None


def main(work):
    round_ = 0
    while not os.path.exists(os.path.join(work, "stop")):
        round_ += 1
        item = DeployedItem(name=f"create-{round_}", stock=round_)
        if not save(work, item.name, item.save):
            continue
        item.name, item.stock = f"save-{round_}", round_ + 1
        save(work, item.name, item.save)
        marker = f"update-{round_}"
        save(work, marker, lambda: DeployedItem.objects.filter(pk=item.pk).update(name=marker))
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
