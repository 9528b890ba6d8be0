"""``keel bench <service>``: start a service, drive it with wrk, and write medians as a table and
a plot.

The runner is generic; what is measured comes from the service (its ``ServiceBench``: scenarios,
targets and a workload that seeds, scripts and checks). Modules: ``scenarios`` (the types, and
the reference rows every table carries), ``reference`` (the reference apps), ``wrk`` (the load
generator and its output), ``stage`` (fresh databases, the server process, counting rows),
``machine`` (what the numbers were measured on), ``runner`` (one scenario, several runs),
``report`` (Markdown, PNG, JSON), ``progress`` (the terminal side) and ``command`` (the CLI).
"""
