"""Registration bundle plugins."""
