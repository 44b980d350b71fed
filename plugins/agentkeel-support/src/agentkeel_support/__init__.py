"""agentkeel-support: the customer-support demo plugin for agentkeel.

Tools (``agentkeel_support.tools``): ``lookup_order``, ``check_inventory``,
``issue_refund`` (compensated by ``cancel_refund``) and ``send_email``, all over
one SQLite shop database (``agentkeel_support.shop``). Rule templates for the
demo requests live in ``agentkeel_support.plugin``.
"""

__version__ = "0.1.0"
