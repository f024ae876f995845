"""virtcontainers: sandboxes that own one long-lived VM each, and their containers."""
