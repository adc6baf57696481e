from django.conf import settings
from django.db import models
from django.db.models.functions import Now


class Order(models.Model):
    """An order. Its table, `public.shop_order`, is what post-save watches."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="orders")
    product = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField(default=1)
    # auto_now_add for the ORM; the column default for everyone else (psql, other services).
    created_at = models.DateTimeField(auto_now_add=True, db_default=Now())

    def __str__(self):
        return f"#{self.pk} {self.quantity} × {self.product}"


class DjangoSignalLog(models.Model):
    """One row per `post_save` that *Django itself* sent for an Order (see signals.py)."""

    order_id = models.BigIntegerField()
    created = models.BooleanField()
    at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"order {self.order_id} created={self.created}"
