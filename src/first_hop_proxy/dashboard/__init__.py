"""The dashboard: one page served by the proxy, its live feed and its JSON API."""

from .views import add_dashboard_routes

__all__ = ["add_dashboard_routes"]
