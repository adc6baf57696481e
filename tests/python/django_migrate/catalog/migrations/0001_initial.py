from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Item",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100)),
                ("stock", models.IntegerField(default=0)),
                ("legacy_code", models.CharField(max_length=20, null=True)),
                ("coupon", models.CharField(max_length=20, null=True)),
            ],
        ),
    ]
