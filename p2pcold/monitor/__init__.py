"""`p2pcold monitor`: follow a swarm, keep its history, serve a web page and a JSON API (monitor.py)."""

from p2pcold.monitor.monitor import Monitor, MonitorOptions

__all__ = ["Monitor", "MonitorOptions"]
