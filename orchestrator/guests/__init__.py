"""Guests beyond the fixture kernel that tests and the demo can run under the launcher."""
