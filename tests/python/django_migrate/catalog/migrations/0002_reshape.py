# The routine reshaping the test applies while the app keeps saving: a column added, one dropped
# and one renamed, in one migration (one transaction on PostgreSQL).
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("catalog", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="item",
            name="note",
            field=models.TextField(null=True),
        ),
        migrations.RemoveField(
            model_name="item",
            name="legacy_code",
        ),
        migrations.RenameField(
            model_name="item",
            old_name="coupon",
            new_name="promo_code",
        ),
    ]
