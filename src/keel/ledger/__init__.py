"""The ledger: accounts and money. Every balance equals the sum of its entries."""
