"""The platform every keel service is built on: settings, database, errors, auth, HTTP plumbing."""
