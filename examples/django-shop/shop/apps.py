from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"

    def ready(self):
        # Connects the classic post_save receiver (for contrast with post-save).
        from . import signals  # noqa: F401
