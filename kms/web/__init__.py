"""The server-rendered ops dashboard (``/dashboard``): HTML only, no JavaScript.

HTTP only, like kms/api: views parse forms, call services, render templates.
"""
