"""Self-service access: agencies grant, request and revoke access to their own services;
operators onboard agencies, publish services and set limits. Every change is a registry
version naming who made it and why (docs/access.md)."""
