"""Pipeline plug-ins of the tests, installed through entry points the tests write."""
