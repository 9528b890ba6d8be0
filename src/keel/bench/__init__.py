"""``keel bench``: start a service, drive it with wrk, and write medians as a table and a plot.

Modules: ``scenarios`` (what is measured and the targets), ``wrk`` (the load generator, its Lua
scripts and its output), ``stage`` (fresh databases, seeding, the server process, the checks
afterwards), ``machine`` (what the numbers were measured on), ``runner`` (one scenario, several
runs), ``report`` (Markdown, PNG, JSON) and ``command`` (the CLI).
"""
