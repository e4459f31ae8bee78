"""Operations: the status overview (overview.py), the Prometheus exporter (metrics.py) and what the
broker holds (broker.py)."""
