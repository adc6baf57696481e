from django.db import models


class Item(models.Model):
    """The watched table, `public.catalog_item`, as migration 0002 leaves it: `note` added,
    `legacy_code` dropped, `coupon` renamed to `promo_code`."""

    name = models.CharField(max_length=100)
    stock = models.IntegerField(default=0)
    note = models.TextField(null=True)
    promo_code = models.CharField(max_length=20, null=True)
