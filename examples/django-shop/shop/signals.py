"""The classic way: a `post_save` receiver inside Django.

It is here only for contrast. It records every `post_save` Django sends for an Order in
`shop_djangosignallog`: `Order.objects.create()` and the admin send one, while `bulk_create()`,
`QuerySet.update()`, raw SQL and `psql` send none. post-save sees all of them, because it watches
the table. (Sending the email from here would also race the commit: a worker could look for the
order before it exists, unless the call is wrapped in `transaction.on_commit`.)
"""
from django.db.models.signals import post_save
from django.dispatch import receiver

from .models import DjangoSignalLog, Order


@receiver(post_save, sender=Order, dispatch_uid="shop.signals.log_order_signal")
def log_order_signal(sender, instance, created, **kwargs):
    DjangoSignalLog.objects.create(order_id=instance.pk, created=created)
