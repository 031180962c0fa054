"""Analysis pipelines: pure image analysis, no Celery, network or database code."""
