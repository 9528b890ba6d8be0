"""A toy service that lives only in the tests: proof that a service is one package plus one
registration, with no edit to ``keel.core`` or ``keel.cli``."""
