"""The inventory: flash sales that never oversell or undersell (DESIGN.md, "inventory")."""
