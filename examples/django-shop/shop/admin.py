from django.contrib import admin

from .models import DjangoSignalLog, Order


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "product", "quantity", "created_at")


@admin.register(DjangoSignalLog)
class DjangoSignalLogAdmin(admin.ModelAdmin):
    list_display = ("order_id", "created", "at")
