"""Celery tasks. post-save enqueues `shop.tasks.send_order_confirmation` for every new row of
`shop_order`, whoever inserted it (see ../post-save.toml)."""
from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail

from .models import Order


# post-save delivers at least once: after a crash a task may be enqueued twice for one order.
# Both copies carry the same task id (`post-save:<database>:<event id>:<handler>`, in
# `self.request.id` of a bound task), so a shop that must never send twice records the ids it
# has handled and skips a repeat.
@shared_task(
    name="shop.tasks.send_order_confirmation",
    autoretry_for=(OSError,),  # SMTP server down or refusing: try again later
    retry_backoff=True,
    max_retries=5,
)
def send_order_confirmation(order_id):
    # post-save runs after COMMIT, so the order is always there to be read.
    order = Order.objects.select_related("user").get(pk=order_id)
    send_mail(
        subject=f"Order #{order.pk} confirmed",
        message=(
            f"Hello {order.user.get_username()},\n\n"
            f"thank you for your order #{order.pk}: {order.quantity} x {order.product}.\n"
        ),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=[order.user.email],
    )
    return order.pk
