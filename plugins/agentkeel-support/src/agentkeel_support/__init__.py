"""agentkeel-support: the customer-support demo plugin for agentkeel.

Tools (``agentkeel_support.tools``): ``lookup_order``, ``check_inventory``,
``issue_refund`` (compensated by ``cancel_refund``), ``send_email`` and
``open_ticket`` (compensated by ``close_ticket``), all over one SQLite shop
database (``agentkeel_support.shop``), and ``track_shipment``, which asks the
carrier's tracking service at ``$AGENTKEEL_CARRIER_URL``. Rule templates for the
demo requests, with their answers, a replan (a bounced email becomes a support
ticket) and an optional step (tracking), live in ``agentkeel_support.plugin``.
"""

__version__ = "0.1.0"
