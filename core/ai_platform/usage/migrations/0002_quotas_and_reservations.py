from tortoise import fields, migrations
from tortoise.indexes import Index
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0001_initial")]

    initial = False

    operations = [
        ops.CreateModel(
            name="KeyDailyUsage",
            fields=[
                ("id", fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("key_id", fields.CharField(max_length=16)),
                ("operation", fields.CharField(max_length=64)),
                ("day", fields.DateField()),
                ("request_count", fields.IntField(default=0)),
                ("total_tokens", fields.BigIntField(default=0)),
            ],
            options={
                "table": "key_daily_usage",
                "app": "models",
                "unique_together": (("key_id", "operation", "day"),),
                "pk_attr": "id",
                "table_description": "Requests and tokens per API key per operation per limit day, counted like daily usage.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="KeyQuota",
            fields=[
                ("id", fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("key_id", fields.CharField(max_length=16)),
                ("operation", fields.CharField(max_length=64)),
                ("daily_limit", fields.IntField()),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={
                "table": "key_quota",
                "app": "models",
                "unique_together": (("key_id", "operation"),),
                "pk_attr": "id",
                "table_description": "An admin's daily limit for one API key (by key id) on one operation.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="Reservation",
            fields=[
                ("id", fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("operation", fields.CharField(max_length=64)),
                ("key_id", fields.CharField(max_length=16)),
                ("day", fields.DateField()),
                ("host", fields.CharField(max_length=255)),
                ("pid", fields.IntField()),
                ("process_started", fields.FloatField()),
                ("expires_at", fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False)),
            ],
            options={
                "table": "reservation",
                "app": "models",
                "indexes": [Index(fields=["host", "pid"])],
                "pk_attr": "id",
                "table_description": "One admitted request still in flight, and the process that owns it.",
            },
            bases=["Model"],
        ),
        ops.AlterModelOptions(
            name="DailyUsage",
            options={
                "table": "daily_usage",
                "app": "models",
                "unique_together": (("operation", "day"),),
                "pk_attr": "id",
                "table_description": "Requests and tokens per operation per limit day (a date in LIMIT_TIMEZONE).",
            },
        ),
    ]
